/**
 * HTML built by a tagged template that escapes every value put into it: `html\`<td>${x}</td>\``
 * escapes `x` unless it is itself `html` (a fragment built the same way). Nothing reaches a page
 * unescaped by accident: a sender `<script>@x` is shown as text, in an element or an attribute.
 */
export class Html {
  constructor(readonly text: string) {}
  toString(): string {
    return this.text;
  }
}

export function html(strings: TemplateStringsArray, ...values: unknown[]): Html {
  let out = strings[0] ?? '';
  values.forEach((v, i) => {
    out += fragment(v) + (strings[i + 1] ?? '');
  });
  return new Html(out);
}

function fragment(v: unknown): string {
  if (v instanceof Html) return v.text;
  if (Array.isArray(v)) return v.map(fragment).join('');
  if (v === null || v === undefined || v === false) return '';
  return escape(String(v));
}

/** Escapes text for an element's content or a quoted attribute value. */
export function escape(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** A URL of the console with its query, the values encoded (then escaped by `html` where used). */
export function href(path: string, query: Record<string, string | number | undefined> = {}): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== '') q.set(k, String(v));
  const s = q.toString();
  return `/console/${path}${s ? `?${s}` : ''}`;
}

/** The stylesheet, served at /console/style.css (the CSP allows no inline style). */
export const STYLE = `
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1b1f24; background: #f6f7f9; }
header { background: #1f3a5f; color: #fff; padding: .5em 1em; display: flex; gap: 1.5em; align-items: center; }
header a { color: #fff; text-decoration: none; } header a.here { text-decoration: underline; }
header form { margin-left: auto; }
main { padding: 1em; max-width: 1200px; }
table { border-collapse: collapse; width: 100%; background: #fff; margin: .5em 0 1em; }
th, td { text-align: left; padding: .3em .5em; border-bottom: 1px solid #dde1e6; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, monospace; font-size: 13px; word-break: break-all; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
.figure { background: #fff; padding: .6em 1em; border: 1px solid #dde1e6; min-width: 8em; }
.figure b { display: block; font-size: 1.6em; }
.notice { background: #e6f4ea; border: 1px solid #9bd3ae; padding: .5em 1em; }
.problem { background: #fdecea; border: 1px solid #f1a9a0; padding: .5em 1em; }
.why { color: #8a4b00; }
form.inline { display: inline; }
button, input[type=submit] { cursor: pointer; }
.danger { background: #b3261e; color: #fff; border: 0; padding: .4em 1em; }
.actions a { margin-right: 1em; }
svg { background: #fff; border: 1px solid #dde1e6; }
`;
