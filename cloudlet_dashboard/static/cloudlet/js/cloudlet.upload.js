/* Upload progress for the modal forms marked data-cloudlet-upload (the base VM package
   import). Horizon's modal code posts such a form with XHR and shows a "Working" spinner;
   this replaces the spinner with Horizon's own progress bar, fed by the upload's progress
   events, until the server answers. */
(function () {
  'use strict';
  var pending = null;  // {url, label} of the form being submitted

  $(document).on('submit', '.modal form[data-cloudlet-upload]', function () {
    pending = {url: $(this).attr('action'), label: $(this).attr('data-cloudlet-upload')};
  });

  $.ajaxPrefilter(function (options) {
    if (!pending || options.type !== 'POST' || options.url !== pending.url) {
      return;
    }
    var label = pending.label;
    pending = null;
    var beforeSend = options.beforeSend;
    var complete = options.complete;
    options.beforeSend = function () {
      var result = beforeSend ? beforeSend.apply(this, arguments) : undefined;
      if (horizon.modals.spinner) {
        horizon.modals.spinner.modal('hide');
      }
      horizon.modals.progress_bar(label);
      return result;
    };
    options.xhr = function () {
      var xhr = new window.XMLHttpRequest();
      xhr.upload.addEventListener('progress', function (evt) {
        if (evt.lengthComputable) {
          horizon.modals.progress_bar.update(evt.loaded / evt.total);
        }
      }, false);
      return xhr;
    };
    options.complete = function (jqXHR) {
      if (!jqXHR.getResponseHeader('X-Horizon-Location') && horizon.modals.bar) {
        horizon.modals.bar.modal('hide');
      }
      return complete ? complete.apply(this, arguments) : undefined;
    };
  });
}());
