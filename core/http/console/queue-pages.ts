import type { RecipientReply } from '../../hooks/catalogue.js';
import { href, html, type Html } from './html.js';
import { page } from './pages.js';
import type { QueueAction, QueueAttempt, QueueMessage, QueueRecipient } from './queue-client.js';

/*
 * The queue's pages: the filtered list, a message with its history, and the confirmation of an
 * action. Pure functions, escaped by `html`, as pages.ts.
 */

export interface QueueFilter {
  readonly state: string;
  readonly to: string;
  readonly from: string;
  readonly page: number;
}

export const QUEUE_STATES = ['all', 'deferred', 'pending', 'held', 'attempting'] as const;
export const PAGE_SIZE = 50;

/** The messages that pass the filter (state, a recipient or its domain, the sender: substrings, any case). */
export function filterQueue(all: readonly QueueMessage[], f: QueueFilter): QueueMessage[] {
  const to = f.to.toLowerCase();
  const from = f.from.toLowerCase();
  return all.filter((m) => {
    if (from && !m.sender.toLowerCase().includes(from)) return false;
    if (to && !m.recipients.some((r) => r.address.toLowerCase().includes(to))) return false;
    switch (f.state) {
      case 'held':
        return m.held;
      case 'attempting':
        return m.attempting;
      case 'deferred':
      case 'pending':
        return m.recipients.some((r) => r.status === f.state);
      default:
        return true;
    }
  });
}

export function queuePage(all: readonly QueueMessage[], f: QueueFilter, csrf: string): string {
  const found = filterQueue(all, f);
  const pages = Math.max(1, Math.ceil(found.length / PAGE_SIZE));
  const n = Math.min(Math.max(1, f.page), pages);
  const shown = found.slice((n - 1) * PAGE_SIZE, n * PAGE_SIZE);
  const link = (p: number): string => href('queue', { state: f.state, to: f.to, from: f.from, page: p });
  const rows = shown.map(
    (m) =>
      html`<tr>
        <td><a class="mono" href="${href('message', { id: m.id })}">${m.id}</a></td>
        <td>${new Date(m.receivedAt).toISOString()}</td>
        <td class="mono">&lt;${m.sender}&gt;</td>
        <td class="mono">${m.recipients.map((r) => html`${r.address} <i>${r.status}</i><br />`)}</td>
        <td class="why">${summary(m)}</td>
      </tr>`,
  );
  return page(
    'Queue',
    html`<form method="get" action="/console/queue">
        <label
          >State
          <select name="state">
            ${QUEUE_STATES.map((s) => html`<option${s === f.state ? html` selected` : ''}>${s}</option>`)}
          </select></label
        >
        <label>Recipient or domain <input name="to" value="${f.to}" maxlength="320" /></label>
        <label>Sender <input name="from" value="${f.from}" maxlength="320" /></label>
        <button>Filter</button>
      </form>
      <p>
        ${found.length} of ${all.length} queued messages
        match${pages > 1 ? html`; page ${n} of ${pages}` : ''}.
      </p>
      ${
        shown.length
          ? html`<table>
              <thead>
                <tr>
                  <th>Queue id</th>
                  <th>Received</th>
                  <th>Sender</th>
                  <th>Recipients</th>
                  <th>Why it waits</th>
                </tr>
              </thead>
              <tbody>
                ${rows}
              </tbody>
            </table>`
          : ''
      }
      <p>
        ${n > 1 ? html`<a href="${link(n - 1)}">← previous page</a> ` : ''}${n < pages ? html`<a href="${link(n + 1)}">next page →</a>` : ''}
      </p>`,
    { tab: 'queue', csrf },
  );
}

/** One line on why a queued message is still there. */
function summary(m: QueueMessage): string {
  if (m.held) return m.heldReason ? `held: quarantined by ${m.heldReason}` : 'held by the administrator';
  if (m.attempting) return 'a delivery attempt is in progress';
  const waiting = m.recipients.filter((r) => r.status === 'deferred' || r.status === 'pending');
  const first = waiting[0];
  return first ? why(first, false) : 'finishing';
}

function replyText(r: RecipientReply): string {
  const text = typeof r.text === 'string' ? r.text : r.text.join(' ');
  return `${r.code} ${r.enhanced ?? ''} ${text}`.replace(/ {2,}/g, ' ');
}

/** Why a recipient waits: what holds it back, or the last reply, and the next attempt. */
function why(r: QueueRecipient, held: boolean): string {
  if (held) return 'held: no attempt until released';
  const next = r.nextAttemptAt ? `; next attempt ${r.nextAttemptAt}` : '';
  if (r.postponed) return `postponed: ${r.postponed.reason} (${r.postponed.by})${next}`;
  if (r.status === 'pending' && r.attempts === 0) return `not tried yet${next}`;
  if (r.lastReply) {
    const who = r.lastReply.remote ? ` from ${r.lastReply.remote}` : '';
    return `deferred: ${replyText(r.lastReply)}${who}${next}`;
  }
  return `${r.status}${next}`;
}

export const ACTION_TEXT: Record<QueueAction, { label: string; does: string; done: string }> = {
  flush: {
    label: 'Flush',
    does: 'tries its deferred recipients now instead of waiting for the next attempt',
    done: 'Flushed: its deferred recipients are being tried now.',
  },
  hold: {
    label: 'Hold',
    does: 'stops delivery attempts until it is released (an attempt in progress finishes)',
    done: 'Held: no delivery attempts until it is released.',
  },
  release: {
    label: 'Release',
    does: 'lets delivery attempts resume on its schedule',
    done: 'Released: attempts resume on schedule (flush it to try now).',
  },
  delete: {
    label: 'Delete',
    does: 'removes it: its recipients not yet delivered fail and the sender is NOT told',
    done: 'Deleted: its recipients were dropped; the sender is not told.',
  },
  bounce: {
    label: 'Bounce',
    does: 'fails it now and returns it to its sender with a delivery status notification',
    done: 'Returned to its sender.',
  },
};

function attemptRow(a: QueueAttempt): Html {
  const what =
    a.kind === 'deleted' || a.kind === 'returned'
      ? `administrator (${a.kind})`
      : [a.transport ?? 'no route', a.route].filter(Boolean).join(' ');
  const peer = a.reply.remote ? `${a.reply.remote} (${a.reply.tls ?? 'no TLS'})` : '';
  return html`<tr>
    <td class="num">${a.n ?? ''}</td>
    <td>${new Date(a.t).toISOString()}</td>
    <td>${what}</td>
    <td class="mono">${peer}</td>
    <td>${a.status}${a.kind === 'expired' ? '; lifetime over' : ''}</td>
    <td class="mono">${replyText(a.reply)}</td>
  </tr>`;
}

export function messagePage(m: QueueMessage, csrf: string, done: QueueAction | null): string {
  const finished = m.finishedAt !== undefined;
  const o = m.origin;
  const origin = o
    ? html`<h2>Origin</h2>
        <table>
          ${
            o.client
              ? html`<tr>
                  <th>Client</th>
                  <td class="mono">[${o.client.address}]:${o.client.port}</td>
                </tr>`
              : ''
          }
          ${
            o.submitted
              ? html`<tr>
                  <th>Client</th>
                  <td>
                    none: submitted by a
                    plugin${o.reportFor ? html` as a report on <a href="${href('message', { id: o.reportFor })}">${o.reportFor}</a>` : ''}
                  </td>
                </tr>`
              : ''
          }
          ${
            o.helo
              ? html`<tr>
                  <th>HELO</th>
                  <td class="mono">${o.helo}</td>
                </tr>`
              : ''
          }
          ${
            o.user
              ? html`<tr>
                  <th>AUTH user</th>
                  <td class="mono">${o.user}</td>
                </tr>`
              : ''
          }
          ${
            o.client
              ? html`<tr>
                  <th>TLS</th>
                  <td>${o.tls ?? 'none'}</td>
                </tr>`
              : ''
          }
          ${
            o.listener
              ? html`<tr>
                  <th>Listener</th>
                  <td>${o.listener}</td>
                </tr>`
              : ''
          }
          ${
            o.messageId
              ? html`<tr>
                  <th>Message-ID</th>
                  <td class="mono">${o.messageId}</td>
                </tr>`
              : ''
          }
          ${(o.verdicts ?? []).map(
            (v) =>
              html`<tr>
                <th>Verdict</th>
                <td class="mono">${v}</td>
              </tr>`,
          )}
        </table>`
    : '';
  const recipients = m.recipients.map(
    (r) =>
      html`<h3 class="mono">
          ${r.address}${r.expandedFrom ? html` <small>(for ${r.expandedFrom})</small>` : ''}
        </h3>
        <p>
          Status: <b class="status">${r.status}</b>, ${r.attempts}
          attempt${r.attempts === 1 ? '' : 's'}${r.transport ? `, by ${r.transport}` : ''}.
        </p>
        ${!finished && (r.status === 'deferred' || r.status === 'pending') ? html`<p class="why">Why it waits: ${why(r, m.held)}</p>` : ''}
        ${
          r.history?.length
            ? html`<table class="attempts">
                <thead>
                  <tr>
                    <th class="num">#</th>
                    <th>When</th>
                    <th>Route</th>
                    <th>Peer</th>
                    <th>Result</th>
                    <th>Reply</th>
                  </tr>
                </thead>
                <tbody>
                  ${r.history.map(attemptRow)}
                </tbody>
              </table>`
            : html`<p>No attempt kept.</p>`
        }`,
  );
  const actions = finished
    ? ''
    : html`<p class="actions">
        ${(m.held
          ? (['release', 'delete', 'bounce'] as const)
          : (['flush', 'hold', 'delete', 'bounce'] as const)
        ).map(
          (a) => html`<a href="${href('confirm', { action: a, id: m.id })}">${ACTION_TEXT[a].label}…</a>`,
        )}
      </p>`;
  const state = finished
    ? html`<p class="notice">Finished ${m.finishedAt}: <b class="outcome">${m.outcome}</b>.</p>`
    : html`<p>
        Still
        queued${m.held ? html`, <b>held</b> (${m.heldReason ? `quarantined by ${m.heldReason}` : 'by the administrator'})` : ''}${m.attempting ? ', a delivery attempt is in progress' : ''}.
      </p>`;
  return page(
    `Message ${m.id}`,
    html`${done ? html`<p class="notice">${ACTION_TEXT[done].done}</p>` : ''} ${state}
      <table>
        <tr>
          <th>Sender</th>
          <td class="mono">&lt;${m.sender}&gt;</td>
        </tr>
        <tr>
          <th>Received</th>
          <td>${m.receivedAt}</td>
        </tr>
        <tr>
          <th>Size</th>
          <td>${m.size} bytes</td>
        </tr>
        ${
          m.reports?.length
            ? html`<tr>
                <th>Reports sent</th>
                <td>
                  ${m.reports.map((id) => html`<a class="mono" href="${href('message', { id })}">${id}</a> `)}
                </td>
              </tr>`
            : ''
        }
      </table>
      ${actions}${origin}
      <h2>Recipients</h2>
      ${recipients}`,
    { tab: 'queue', csrf },
  );
}

export function confirmPage(m: QueueMessage, action: QueueAction, csrf: string): string {
  const t = ACTION_TEXT[action];
  return page(
    `${t.label} ${m.id}?`,
    html`<p>
        ${t.label} the message from <span class="mono">&lt;${m.sender}&gt;</span> to
        <span class="mono">${m.recipients.map((r) => r.address).join(', ')}</span>: this ${t.does}.
      </p>
      <form method="post" action="/console/action">
        <input type="hidden" name="csrf" value="${csrf}" /><input
          type="hidden"
          name="action"
          value="${action}"
        />
        <input type="hidden" name="id" value="${m.id}" />
        <button
          class="${action === 'delete' || action === 'bounce' ? 'danger' : ''}"
          name="confirm"
          value="yes"
        >
          ${t.label}
        </button>
        <a href="${href('message', { id: m.id })}">Cancel</a>
      </form>`,
    { tab: 'queue', csrf },
  );
}
