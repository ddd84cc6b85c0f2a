// Progressive enhancement only: every page works without it.
(function () {
  "use strict";

  // Show only the fields of the chosen check type (a fieldset may serve several: data-for-type="tcp grpc").
  function syncType(form) {
    var select = form.querySelector("[data-check-type]");
    if (!select) return;
    form.querySelectorAll("fieldset[data-for-type]").forEach(function (fieldset) {
      var shown = fieldset.getAttribute("data-for-type").split(" ").indexOf(select.value) !== -1;
      fieldset.hidden = !shown;
      fieldset.disabled = !shown;
    });
  }
  document.querySelectorAll("[data-check-form]").forEach(function (form) {
    syncType(form);
    form.querySelector("[data-check-type]").addEventListener("change", function () { syncType(form); });
  });

  // A form shown again with the API's messages: the first field in error takes the focus (its description says
  // why), rather than leaving a keyboard or screen-reader user at the top of a long page.
  var invalid = document.querySelector("[data-check-form] [aria-invalid=true]");
  if (invalid) invalid.focus();

  // Ask before deleting.
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
    });
  });

  // "Test now" shows the result in place.
  document.querySelectorAll("form[data-test-now]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var output = form.querySelector(".test-result");
      var button = form.querySelector("button");
      output.textContent = "Running…";
      button.disabled = true;
      fetch(form.action, { method: "POST", body: new FormData(form), headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (response) { return response.json().then(function (body) { return { ok: response.ok, body: body }; }); })
        .then(function (answer) {
          if (!answer.ok) { output.textContent = answer.body.detail || "The test failed to run."; return; }
          var result = answer.body;
          output.textContent = (result.healthy ? "Healthy" : "Unhealthy (" + result.reason + ")") + ": " + result.detail + " · " + Math.round(result.latency_ms) + " ms";
          output.className = "test-result " + (result.healthy ? "status-healthy" : "status-unhealthy");
        })
        .catch(function () { output.textContent = "The test failed to run."; })
        .finally(function () { button.disabled = false; });
    });
  });

  // "Send test" (notifications page) shows what the receiver answered in place.
  document.querySelectorAll("form[data-send-test]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var output = form.querySelector(".test-result");
      var button = form.querySelector("button");
      output.textContent = "Sending…";
      output.className = "test-result";
      button.disabled = true;
      fetch(form.action, { method: "POST", body: new FormData(form), headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (response) { return response.json().then(function (body) { return { ok: response.ok, body: body }; }); })
        .then(function (answer) {
          if (!answer.ok) { output.textContent = answer.body.detail || "The test could not be sent."; return; }
          var result = answer.body;
          output.textContent = (result.delivered ? "Delivered" : "Not delivered") + (result.status_code === null ? "" : " (" + result.status_code + ")") + ": " + result.detail;
          output.className = "test-result " + (result.delivered ? "status-healthy" : "status-unhealthy");
        })
        .catch(function () { output.textContent = "The test could not be sent."; })
        .finally(function () { button.disabled = false; });
    });
  });

  // The hosts page refreshes its table without a full reload.
  var region = document.getElementById("hosts-region");
  if (region && region.getAttribute("data-refresh")) {
    window.setInterval(function () {
      if (document.hidden) return;
      fetch(region.getAttribute("data-refresh"), { credentials: "same-origin" })
        .then(function (response) {
          // The session ended (sign-out elsewhere, expiry): the fetch followed the redirect to the sign-in
          // page; load it as a page instead of pasting it into the table.
          if (response.redirected) { window.location.reload(); return null; }
          return response.ok ? response.text() : null;
        })
        .then(function (html) {
          if (html === null) return;
          // Keep the hosts selected for the preview checked: the new table comes without the selection.
          var selected = {};
          region.querySelectorAll("input[name=host_id]:checked").forEach(function (box) { selected[box.value] = true; });
          region.innerHTML = html;
          region.querySelectorAll("input[name=host_id]").forEach(function (box) { if (selected[box.value]) box.checked = true; });
        })
        .catch(function () {});
    }, 5000);
  }
})();
