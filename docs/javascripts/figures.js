// Marks the page with how many of its figures (images in the article) the browser decoded, so the docs test
// (tests/docs/test_site.py, headless Chromium) can check figures render, not only that <img> exists.
window.addEventListener("load", function () {
  var figures = document.querySelectorAll("article img");
  var rendered = Array.prototype.filter.call(figures, function (img) {
    return img.complete && img.naturalWidth > 0;
  }).length;
  document.body.setAttribute("data-figures", String(figures.length));
  document.body.setAttribute("data-figures-rendered", String(rendered));
});
