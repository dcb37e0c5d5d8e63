// /docs: Swagger UI on this server's OpenAPI document (api/docs.py). A file, not an inline
// script, so the Content-Security-Policy needs no 'unsafe-inline' for scripts.
window.addEventListener("DOMContentLoaded", function () {
  const box = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({url: box.dataset.spec, dom_id: "#swagger-ui", deepLinking: true,
                               tryItOutEnabled: false, validatorUrl: null});
});
