/**
 * The hosts of the URLs in a text, found as the text streams past: pure functions and small
 * stateful decoders, no I/O. What counts as a URL:
 *
 * - `http://` or `https://` (any case) followed by an authority: the host is what a browser would
 *   go to (WHATWG URL parsing: `user@` dropped, `%65` decoded, an IDN in its `xn--` form, a
 *   trailing dot dropped);
 * - a bare `www.` name not glued to a word before it (`see www.example.com`).
 *
 * Hosts that are IP addresses (literal or the numeric forms browsers accept) and names without a
 * dot are not domains and are dropped. Each carried-over piece of text is bounded, so memory is a
 * few hundred characters whatever the input.
 */
import { isIP } from 'node:net';
import { getDomain } from 'tldts';

/** The longest authority read (user info, host, port); a DNS name is at most 253 octets. */
const MAX_AUTHORITY = 600;

/**
 * Characters that end an authority: whitespace, the path, query and fragment starts, quotes and
 * brackets that close a URL in prose or HTML, `\` (which browsers read as `/` in http URLs).
 */
const AUTHORITY = `[^\\s/?#"'<>\\\\()\\[\\]{}|^\`,;]{1,${MAX_AUTHORITY}}`;
const URL_PATTERN = new RegExp(`https?://(${AUTHORITY})|(?<![\\w.@/-])(www\\.${AUTHORITY})`, 'gi');

/** Held back at the end of a chunk so that a scheme cut in two (`htt` | `ps://`) is seen whole. */
const SCHEME_TAIL = 8;

/** The host a browser would visit for this authority, or null when it is no domain name. */
export function hostOf(authority: string): string | null {
  let host: string;
  try {
    host = new URL(`http://${authority}/`).hostname;
  } catch {
    return null;
  }
  host = host.replace(/\.+$/, '');
  if (host === '' || host.startsWith('[') || isIP(host) !== 0) return null;
  if (!host.includes('.') || host.length > 253) return null;
  return host;
}

/**
 * The registered domain of a host by the Public Suffix List, ICANN and private sections alike:
 * `a.b.example.co.uk` → `example.co.uk`, `spam.blogspot.com` → `spam.blogspot.com` (a private
 * suffix, whose subdomains belong to different people, as URI block lists list them). A name
 * under a suffix the list does not know counts its last label as the suffix. Null for a public
 * suffix itself (`co.uk`).
 */
export function registeredDomain(host: string): string | null {
  return getDomain(host, { allowPrivateDomains: true });
}

/** Finds URL hosts in text given in pieces; a URL cut between two pieces is found whole. */
export class UrlHosts {
  private carry = '';

  /** The hosts completed by this piece of text (a host may come more than once). */
  write(text: string): string[] {
    const s = this.carry + text;
    const hosts: string[] = [];
    let keepFrom = Math.max(0, s.length - SCHEME_TAIL);
    URL_PATTERN.lastIndex = 0;
    for (let m = URL_PATTERN.exec(s); m !== null; m = URL_PATTERN.exec(s)) {
      if (m.index + m[0].length === s.length && m[0].length < MAX_AUTHORITY) {
        // The authority runs to the end of what we have: it may go on in the next piece.
        keepFrom = Math.min(keepFrom, m.index);
        break;
      }
      const host = hostOf(m[1] ?? m[2]!);
      if (host) hosts.push(host);
    }
    this.carry = s.slice(keepFrom);
    return hosts;
  }

  /** The hosts of what was held back, at the end of the text. */
  end(): string[] {
    const rest = this.carry;
    this.carry = '';
    const hosts: string[] = [];
    URL_PATTERN.lastIndex = 0;
    for (let m = URL_PATTERN.exec(rest); m !== null; m = URL_PATTERN.exec(rest)) {
      const host = hostOf(m[1] ?? m[2]!);
      if (host) hosts.push(host);
    }
    return hosts;
  }
}

/** The named character references that matter in a URL's host and its delimiters. */
const NAMED: Readonly<Record<string, string>> = {
  amp: '&',
  lt: '<',
  gt: '>',
  quot: '"',
  apos: "'",
  nbsp: ' ',
  sol: '/',
  colon: ':',
  period: '.',
  commat: '@',
  percnt: '%',
};

function decodeEntities(text: string): string {
  return text.replace(/&(?:#x([0-9a-f]{1,6});?|#([0-9]{1,7});?|([a-z]{2,6});)/gi, (all, hex, dec, name) => {
    if (name !== undefined) return NAMED[(name as string).toLowerCase()] ?? all;
    const cp = hex !== undefined ? parseInt(hex as string, 16) : Number(dec);
    return cp > 0 && cp <= 0x10ffff && (cp < 0xd800 || cp > 0xdfff) ? String.fromCodePoint(cp) : all;
  });
}

/**
 * Decodes HTML character references (`&#46;`, `&#x2f;`, `&period;`, `&amp;`) as the text streams
 * past, so `http&#58;//example&#46;com` is read as a browser shows it. A reference cut between
 * two pieces is held back until it is whole.
 */
export class HtmlEntities {
  private carry = '';

  write(text: string): string {
    const s = this.carry + text;
    const cut = /&#?[a-z0-9]{0,7}$/i.exec(s);
    this.carry = cut ? s.slice(cut.index) : '';
    return decodeEntities(cut ? s.slice(0, cut.index) : s);
  }

  end(): string {
    const rest = this.carry;
    this.carry = '';
    return decodeEntities(rest);
  }
}
