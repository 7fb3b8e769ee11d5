import type { OpenSession } from '../../smtp/server.js';
import { href, html, type Html } from './html.js';
import type { Figures, RatePoint } from './rates.js';

/*
 * The console's frame and its pages other than the queue's (queue-pages.ts): login, the overview
 * with its rate graph, the open sessions, a problem. Pure functions from what was read to HTML,
 * escaped by `html`. Forms that change something are POSTs carrying the session's CSRF token.
 */

export type Tab = 'overview' | 'queue' | 'sessions';

export function page(
  title: string,
  body: Html,
  opts: { tab?: Tab; csrf?: string; refresh?: number } = {},
): string {
  const tab = (t: Tab, label: string): Html =>
    html`<a href="${href(t === 'overview' ? '' : t)}" ${opts.tab === t ? html` class="here"` : ''}
      >${label}</a
    >`;
  const nav = opts.csrf
    ? html`<header>
        <b>Petrel</b>${tab('overview', 'Overview')}${tab('queue', 'Queue')}${tab('sessions', 'Sessions')}
        <form method="post" action="/console/logout">
          <input type="hidden" name="csrf" value="${opts.csrf}" /><button>Log out</button>
        </form>
      </header>`
    : html`<header><b>Petrel</b></header>`;
  return `<!doctype html>
${html`<html lang="en">
  <head>
    <meta charset="utf-8" />
    <title>${title} · Petrel</title>
    <meta name="viewport" content="width=device-width, initial-scale=1" />
    ${opts.refresh ? html`<meta http-equiv="refresh" content="${opts.refresh}" />` : ''}
    <link rel="stylesheet" href="/console/style.css" />
  </head>
  <body>
    ${nav}
    <main>
      <h1>${title}</h1>
      ${body}
    </main>
  </body>
</html>`}
`;
}

export function loginPage(problem: string | null): string {
  return page(
    'Log in',
    html`${problem ? html`<p class="problem">${problem}</p>` : ''}
      <form method="post" action="/console/login">
        <label
          >Console token
          <input type="password" name="token" autocomplete="current-password" autofocus required
        /></label>
        <button>Log in</button>
      </form>`,
  );
}

/** Messages per second as an inline SVG: accepted and delivered over the sampled minutes. */
export function rateGraph(points: readonly RatePoint[]): Html {
  const W = 600;
  const H = 160;
  if (points.length < 2)
    return html`<p>The rate graph fills in while this page is open (a point every few seconds).</p>`;
  const max = Math.max(1, ...points.flatMap((p) => [p.accepted, p.delivered]));
  const t0 = points[0]!.at;
  const span = Math.max(1, points.at(-1)!.at - t0);
  const line = (pick: (p: RatePoint) => number): string =>
    points
      .map((p) => `${(((p.at - t0) / span) * W).toFixed(1)},${(H - (pick(p) / max) * (H - 10)).toFixed(1)}`)
      .join(' ');
  const last = points.at(-1)!;
  return html`<svg
    xmlns="http://www.w3.org/2000/svg"
    width="${W}"
    height="${H + 20}"
    viewBox="0 0 ${W} ${H + 20}"
    role="img"
    aria-label="messages per second"
  >
    <polyline fill="none" stroke="#1f77b4" stroke-width="2" points="${line((p) => p.accepted)}" />
    <polyline fill="none" stroke="#2ca02c" stroke-width="2" points="${line((p) => p.delivered)}" />
    <text x="4" y="12" font-size="11">${max.toFixed(1)}/s</text>
    <text x="4" y="${H + 15}" font-size="11" fill="#1f77b4">accepted ${last.accepted.toFixed(2)}/s</text>
    <text x="160" y="${H + 15}" font-size="11" fill="#2ca02c">delivered ${last.delivered.toFixed(2)}/s</text>
    <text x="${W - 4}" y="${H + 15}" font-size="11" text-anchor="end">
      last ${Math.round(span / 60_000) || '<1'} min
    </text>
  </svg>`;
}

export function overviewPage(f: Figures | null, points: readonly RatePoint[], csrf: string): string {
  const figure = (label: string, n: number | undefined): Html =>
    html`<div class="figure">${label}<b>${n ?? 0}</b></div>`;
  const body = f
    ? html`<div class="figures">
          ${figure('Accepted', f.accepted)}${figure('Delivered', f.delivered)}${figure('Deferred attempts', f.deferred)}
          ${figure('Failed', f.failed)}${figure('Open connections', f.connectionsOpen)}
          ${Object.entries(f.queue).map(([state, n]) => figure(`Queue: ${state}`, n))}
        </div>
        <h2>Messages per second</h2>
        ${rateGraph(points)}`
    : html`<p class="problem">No process answered for its metrics.</p>`;
  return page('Overview', body, { tab: 'overview', csrf, refresh: 5 });
}

export function problemPage(title: string, problem: string, csrf: string | undefined, back?: string): string {
  return page(
    title,
    html`<p class="problem">${problem}</p>
      ${back ? html`<p><a href="${back}">Back</a></p>` : ''}`,
    csrf ? { csrf } : {},
  );
}

export function sessionsPage(
  workers: readonly { readonly worker: number; readonly sessions: readonly OpenSession[] | null }[],
  csrf: string,
): string {
  const rows = workers.flatMap((w) =>
    (w.sessions ?? []).map(
      (s) =>
        html`<tr>
          <td class="num">${w.worker}</td>
          <td class="mono">${s.client}</td>
          <td>${s.listener}</td>
          <td>${s.state}</td>
          <td class="mono">${s.helo ?? ''}</td>
          <td>${s.tls ?? 'none'}</td>
          <td class="mono">${s.user ?? ''}</td>
          <td>${s.since}</td>
        </tr>`,
    ),
  );
  const silent = workers.filter((w) => w.sessions === null).map((w) => w.worker);
  return page(
    'Open SMTP sessions',
    html`${silent.length ? html`<p class="problem">Worker ${silent.join(', ')} did not answer.</p>` : ''}
      <p>${rows.length} open session${rows.length === 1 ? '' : 's'} (at most 500 per worker are listed).</p>
      ${
        rows.length
          ? html`<table>
              <thead>
                <tr>
                  <th class="num">Worker</th>
                  <th>Client</th>
                  <th>Listener</th>
                  <th>State</th>
                  <th>HELO</th>
                  <th>TLS</th>
                  <th>User</th>
                  <th>Since</th>
                </tr>
              </thead>
              <tbody>
                ${rows}
              </tbody>
            </table>`
          : ''
      }`,
    { tab: 'sessions', csrf, refresh: 10 },
  );
}
