// Answers as Markdown (code blocks, lists, tables), rendered by marked and sanitised by DOMPurify, which
// scripts/setup takes from the npm registry. The model's text is never trusted: HTML in it is shown as text,
// and whatever the renderer makes goes through the sanitiser. Without the libraries answers are plain text.

// What Markdown produces, nothing else: no images (they would fetch from anywhere), forms, frames or styles.
const SANITISE = {
  ALLOWED_TAGS: ["a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "input",
    "li", "ol", "p", "pre", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul"],
  ALLOWED_ATTR: ["href", "title", "class", "start", "align", "type", "checked", "disabled"],
  ALLOWED_URI_REGEXP: /^(?:https?|mailto):/i,
  RETURN_DOM_FRAGMENT: true,
};

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

async function load() {
  if (document.body.dataset.markdown !== "on") return null;
  try {
    const [{ Marked }, { default: DOMPurify }] = await Promise.all([
      import("../vendor/marked.esm.js"), import("../vendor/purify.es.js")]);
    const marked = new Marked({
      gfm: true,
      breaks: true,
      renderer: {
        // Raw HTML in the model's text is text to read, not markup.
        html: ({ text }) => escapeHtml(text),
        // An image would be a request to wherever the model says: show its link instead.
        image: ({ href, text }) => `<a href="${escapeHtml(href || "")}">${escapeHtml(text || href || "image")}</a>`,
      },
    });
    DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A") {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer");
      }
      if (node.tagName === "INPUT") node.setAttribute("disabled", "");
    });
    return { marked, DOMPurify };
  } catch (error) {
    console.warn("Markdown libraries unavailable; answers are shown as plain text.", error);
    return null;
  }
}

let libraries = null;
export const ready = load().then((loaded) => {
  libraries = loaded;
});

// Show `text` in `target`: sanitised Markdown when the libraries are there, else as it is.
export function render(target, text) {
  target.classList.toggle("plain", !libraries); // text shown before the libraries came in is Markdown now
  if (!libraries) {
    target.textContent = text;
    return;
  }
  const { marked, DOMPurify } = libraries;
  target.replaceChildren(DOMPurify.sanitize(marked.parse(text), SANITISE));
}
