/** The `Authentication-Results` field (RFC 8601): building ours, spotting forged ones. */

/**
 * The value of our field: the authserv-id, then one resinfo per result, each on its own folded
 * line (RFC 8601 §2.2). `parts` are the `method=result …` strings of the checks.
 */
export function authResultsValue(authservId: string, parts: readonly string[]): string {
  const body = parts.map((p) => p.replace(/\r?\n/g, '\r\n')).join(';\r\n ');
  return parts.length ? `${authservId};\r\n ${body}` : `${authservId}; none`;
}

/** The authserv-id a field value names: its first token, comments (RFC 5322 CFWS) removed. */
export function authservIdOf(value: string): string {
  let text = '';
  let depth = 0;
  for (let i = 0; i < value.length; i++) {
    const ch = value[i]!;
    if (ch === '\\' && depth > 0) i++;
    else if (ch === '(') depth++;
    else if (ch === ')' && depth > 0) depth--;
    else if (depth === 0) text += ch;
  }
  const m = /^[\s]*("(?:[^"\\]|\\.)*"|[^\s;]+)/.exec(text);
  return m ? m[1]!.replace(/^"|"$/g, '').toLowerCase() : '';
}

/**
 * Does this `Authentication-Results` value claim to come from us? RFC 8601 §5: a field with our
 * authserv-id that arrives from outside is a forgery and must be removed; others are kept.
 */
export function claimsAuthservId(value: string, authservId: string): boolean {
  return authservIdOf(value) === authservId.toLowerCase();
}
