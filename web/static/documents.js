/* Documents list and view: delete through DELETE /api/documents/{id}, after a confirmation. */
"use strict";
document.addEventListener("click", async function (event) {
  var button = event.target.closest("button[data-delete]");
  if (!button) return;
  var name = button.getAttribute("data-name");
  if (!window.confirm("Delete " + name + "? It is removed from every index.")) return;
  var status = document.getElementById("doc-status");
  button.disabled = true;
  var response = await window.appliance.api("DELETE", "/api/documents/" + encodeURIComponent(button.getAttribute("data-delete")));
  if (response.ok) {
    status.textContent = name + " deleted.";
    var after = button.getAttribute("data-after");
    if (after) { window.location.assign(after); return; }
    var row = button.closest("tr");
    if (row) row.remove();
  } else {
    status.textContent = await window.appliance.errorText(response);
    button.disabled = false;
  }
});
