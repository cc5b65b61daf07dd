/* Shared helpers: the session's CSRF token and JSON calls to the appliance's own API. */
"use strict";
window.appliance = (function () {
  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }
  function api(method, path, body) {
    var options = { method: method, credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken() } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    return fetch(path, options);
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
