/**
 * Formats an SMTP reply. RFC 5321 §4.2.1: every line but the last uses `code-`, the last `code `.
 * RFC 2034 §3: the enhanced code prefixes every line's text, except on the greeting and the
 * HELO/EHLO replies (pass `null` for those).
 */
export function formatReply(code: number, enhanced: string | null, text: string | readonly string[]): string {
  if (typeof text === 'string' && !/[\r\n]/.test(text)) {
    return `${code} ${enhanced ? `${enhanced} ${text}` : text}\r\n`;
  }
  const lines = (typeof text === 'string' ? [text] : text.length ? text : ['']).flatMap((t) =>
    // A plugin's text can never inject a reply line or a bare CR.
    String(t).split(/\r\n|\r|\n/),
  );
  let out = '';
  for (let i = 0; i < lines.length; i++) {
    const sep = i === lines.length - 1 ? ' ' : '-';
    const body = enhanced ? `${enhanced} ${lines[i]}` : lines[i];
    out += `${code}${sep}${body}\r\n`;
  }
  return out;
}
