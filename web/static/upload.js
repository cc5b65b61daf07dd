/* The upload page: each file is sent on its own (XMLHttpRequest, for upload progress), then its
   ingestion job is polled until it is done or failed. */
"use strict";
(function () {
  var form = document.getElementById("upload-form");
  if (!form) return;
  var drop = document.getElementById("drop");
  var input = document.getElementById("files");
  var list = document.getElementById("uploads");
  var problem = document.getElementById("upload-error");
  var maxBytes = Number(form.getAttribute("data-max-mb")) * 1024 * 1024;
  var STATES = { queued: "Waiting to be read…", running: "Reading, splitting and indexing…" };
  var STAGES = { parsing: "Reading the file (parse)…", embedding: "Embedding the passages…", indexing: "Indexing…" };

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function acl() {
    if (form.querySelector('input[name="access"]:checked').value === "default") return "";
    var items = Array.prototype.map.call(form.querySelectorAll('input[name="acl-group"]:checked'), function (i) { return "group:" + i.value; });
    document.getElementById("acl-users").value.split(",").forEach(function (name) {
      name = name.trim();
      if (name) items.push("user:" + name);
    });
    return items.length ? items.join(",") : null;
  }

  function setState(row, text, kind) {
    row.state.textContent = text;
    row.state.className = "state" + (kind ? " " + kind : "");
  }

  function poll(row, jobId) {
    async function check() {
      var response = await window.appliance.api("GET", "/api/jobs/" + encodeURIComponent(jobId));
      if (response.status === 429 || response.status === 503) {
        // Over the rate limit or the server is busy: the upload itself is fine, ask again later.
        var wait = parseInt(response.headers.get("Retry-After") || "2", 10);
        setTimeout(check, Math.max(1, isNaN(wait) ? 2 : wait) * 1000);
        return;
      }
      if (!response.ok) { setState(row, "Failed: " + await window.appliance.errorText(response), "failed"); return; }
      var job = await response.json();
      if (job.state === "done") {
        row.progress.value = 100;
        setState(row, "Done (" + (job.result || "added") + ")", "done");
        if (job.document_id) {
          var link = el("a", "", "open");
          link.href = "/documents/" + encodeURIComponent(job.document_id);
          row.state.appendChild(document.createTextNode(" · "));
          row.state.appendChild(link);
        }
      } else if (job.state === "failed") {
        setState(row, "Failed: " + (job.reason || "unknown reason"), "failed");
      } else {
        setState(row, STAGES[job.stage] || STATES[job.state] || job.state);
        setTimeout(check, 700);
      }
    }
    setTimeout(check, 700);
  }

  function send(file, collection, aclValue) {
    var li = el("li");
    li.appendChild(el("span", "name", file.name));
    var progress = el("progress");
    progress.max = 100;
    progress.value = 0;
    progress.setAttribute("aria-label", "Upload of " + file.name);
    li.appendChild(progress);
    var row = { progress: progress, state: el("span", "state", "Uploading…") };
    li.appendChild(row.state);
    list.appendChild(li);
    if (file.size > maxBytes) { setState(row, "Failed: larger than the upload limit", "failed"); return; }
    var data = new FormData();
    data.append("collection", collection);
    if (aclValue) data.append("acl", aclValue);
    data.append("file", file, file.name);
    transmit(row, data);
  }

  function transmit(row, data) {
    var xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/documents");
    xhr.setRequestHeader("X-CSRF-Token", window.appliance.csrfToken());
    xhr.upload.addEventListener("progress", function (event) {
      if (event.lengthComputable) {
        row.progress.value = Math.round((event.loaded / event.total) * 90);
        setState(row, "Uploading " + Math.round((event.loaded / event.total) * 100) + "%");
      }
    });
    xhr.addEventListener("load", function () {
      if (xhr.status === 429 || xhr.status === 503) {
        // Over the rate limit or the server is busy: send the same file again when it says.
        var wait = parseInt(xhr.getResponseHeader("Retry-After") || "2", 10);
        setState(row, "Waiting for the server…");
        setTimeout(function () { transmit(row, data); }, Math.max(1, isNaN(wait) ? 2 : wait) * 1000);
        return;
      }
      var body = null;
      try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
      if (xhr.status !== 200) { setState(row, "Failed: " + ((body && body.error) || "upload refused (" + xhr.status + ")"), "failed"); return; }
      var job = body.jobs[0];
      if (job.error) { setState(row, "Failed: " + job.error, "failed"); return; }
      row.progress.value = 90;
      setState(row, STATES.queued);
      poll(row, job.job_id);
    });
    xhr.addEventListener("error", function () { setState(row, "Failed: the connection was lost", "failed"); });
    xhr.send(data);
  }

  function start(files) {
    problem.hidden = true;
    var aclValue = acl();
    if (aclValue === null) { problem.textContent = "Choose at least one group or user, or the collection default."; problem.hidden = false; return; }
    var select = document.getElementById("collection");
    var fresh = document.getElementById("new-collection");
    var collection = (fresh && fresh.value.trim()) || (select ? select.value : "");  // a new name, when given, wins
    if (!collection) { problem.textContent = "Choose a collection, or name a new one."; problem.hidden = false; return; }
    Array.prototype.forEach.call(files, function (file) { send(file, collection, aclValue); });
  }

  input.addEventListener("change", function () { start(input.files); input.value = ""; });
  drop.addEventListener("dragover", function (event) { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", function () { drop.classList.remove("over"); });
  drop.addEventListener("drop", function (event) {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer && event.dataTransfer.files.length) start(event.dataTransfer.files);
  });
  drop.addEventListener("keydown", function (event) {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
})();
