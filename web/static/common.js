/* Shared helpers: the session's CSRF token and JSON calls to the appliance's own API. */
"use strict";
window.appliance = (function () {
  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }
  function pause(response) {
    var seconds = parseInt(response.headers.get("Retry-After") || "2", 10);
    return new Promise(function (done) { setTimeout(done, Math.max(1, isNaN(seconds) ? 2 : seconds) * 1000); });
  }
  // A 429 (over the user's rate limit) or 503 (server queue full) means the request was not carried
  // out: wait as the server says and send it again, a few times, before showing the error.
  async function api(method, path, body) {
    var options = { method: method, credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken() } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    for (var attempt = 0; ; attempt++) {
      var response = await fetch(path, options);
      if ((response.status !== 429 && response.status !== 503) || attempt >= 4) return response;
      await pause(response);
    }
  }
  async function errorText(response) {
    try {
      var data = await response.json();
      if (data && data.error) return data.error;
    } catch (e) { /* not JSON */ }
    if (response.status === 401) return "Your session has ended: reload the page and sign in again.";
    return "The request failed (" + response.status + ").";
  }
  return { csrfToken: csrfToken, api: api, errorText: errorText };
})();
