/* A page that says it shows something still running (an element with
   data-cloudlet-refresh="<milliseconds>", e.g. a synthesis in progress) reloads itself after
   that delay, so that its figures stay live. */
(function () {
  'use strict';
  horizon.addInitFunction(function () {
    var marker = document.querySelector('[data-cloudlet-refresh]');
    if (marker) {
      var delay = parseInt(marker.getAttribute('data-cloudlet-refresh'), 10) || 5000;
      window.setTimeout(function () { window.location.reload(); }, delay);
    }
  });
}());
