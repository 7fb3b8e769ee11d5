import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { simpleParser, type AddressObject } from 'mailparser';
import SMTPConnection from 'nodemailer/lib/smtp-connection/index.js';
import { SMTPServer } from 'smtp-server';
import { routeTo, type PeerCapabilities } from '../../core/index.js';
import { address, runHook, setupPlugin } from '../../core/testing/index.js';
import { readWithPython } from '../../test/harness/python-email.js';
import { buildReport } from '../bounce/report.js';
import mime7bit from './index.js';

const SEVEN_BIT: PeerCapabilities = { eightBitMime: false, smtputf8: false };
const EIGHT_BIT: PeerCapabilities = { eightBitMime: true, smtputf8: false };
const UTF8: PeerCapabilities = { eightBitMime: true, smtputf8: true };

/** A message from lines; a Buffer line goes in as its octets (Latin-1 text, binary data). */
function mime(...lines: (string | Buffer)[]): Buffer {
  const parts: Buffer[] = [];
  lines.forEach((line, i) => {
    if (i) parts.push(Buffer.from('\r\n'));
    parts.push(typeof line === 'string' ? Buffer.from(line, 'utf8') : line);
  });
  return Buffer.concat(parts);
}

const latin1 = (text: string): Buffer => Buffer.from(text, 'latin1');

function context(content: Readable, peer: PeerCapabilities, smtputf8 = false) {
  return {
    message: {
      id: 'Q7BIT',
      sender: null,
      mailParams: { smtputf8 },
      receivedAt: new Date(),
      size: 0,
      stream: () => content,
    },
    route: routeTo('smtp').route,
    peer,
    content,
  };
}

async function collect(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

/** Runs the plugin's transform hook on a message, with the content split into small chunks. */
async function transform(
  message: Buffer,
  peer: PeerCapabilities = SEVEN_BIT,
  opts: { smtputf8?: boolean; config?: { always?: boolean }; chunk?: number } = {},
): Promise<Buffer> {
  const size = opts.chunk ?? 1000;
  const chunks: Buffer[] = [];
  for (let i = 0; i < message.length; i += size) chunks.push(message.subarray(i, i + size));
  const out = await runHook(mime7bit, 'transform', context(Readable.from(chunks), peer, opts.smtputf8), {
    config: opts.config ?? {},
  });
  return collect(out);
}

/** Every line 7-bit (no octet above 127, no NUL), at most 998 octets, ended by CRLF. */
function assertSevenBit(out: Buffer): void {
  let start = 0;
  for (let i = 0; i < out.length; i++) {
    const b = out[i]!;
    assert.ok(b < 0x80 && b !== 0, `octet 0x${b.toString(16)} at ${i}`);
    if (b === 0x0d) assert.equal(out[i + 1], 0x0a, `bare CR at ${i}`);
    if (b === 0x0a) {
      assert.equal(out[i - 1], 0x0d, `bare LF at ${i}`);
      assert.ok(i - 1 - start <= 998, `line of ${i - 1 - start} octets at ${start}`);
      start = i + 1;
    }
  }
  assert.equal(start, out.length, 'the message ends with CRLF');
}

function names(a: AddressObject | AddressObject[] | undefined): { name: string; address?: string }[] {
  const list = a === undefined ? [] : Array.isArray(a) ? a : [a];
  return list.flatMap((o) => o.value.map((v) => ({ name: v.name, address: v.address })));
}

interface Digest {
  subject: string | undefined;
  from: { name: string; address?: string }[];
  to: { name: string; address?: string }[];
  text: string | undefined;
  html: string | false | undefined;
  attachments: {
    filename: string | undefined;
    contentType: string;
    sha256?: string;
    message?: Digest;
  }[];
}

/** What a recipient sees, as a MIME parser reads it; an attached message is read in turn. */
async function digest(raw: Buffer): Promise<Digest> {
  const m = await simpleParser(raw, { skipHtmlToText: true, skipTextToHtml: true, skipImageLinks: true });
  const attachments: Digest['attachments'] = [];
  for (const a of m.attachments) {
    attachments.push(
      a.contentType === 'message/rfc822'
        ? { filename: a.filename, contentType: a.contentType, message: await digest(a.content) }
        : {
            filename: a.filename,
            contentType: a.contentType,
            sha256: createHash('sha256').update(a.content).digest('hex'),
          },
    );
  }
  return {
    subject: m.subject,
    from: names(m.from),
    to: names(m.to),
    text: m.text,
    html: m.html,
    attachments,
  };
}

/** Downgrades for a 7-bit peer, checks the wire form, and checks the reader sees the same. */
async function roundTrip(message: Buffer): Promise<{ out: Buffer; before: Digest; after: Digest }> {
  const out = await transform(message);
  assertSevenBit(out);
  const [before, after] = await Promise.all([digest(message), digest(out)]);
  assert.deepEqual(after, before);
  // And the result is stable: a second pass has nothing left to do.
  assert.ok((await transform(out)).equals(out), 'a downgraded message passes unchanged');
  return { out, before, after };
}

const CHINESE = '你好，世界！这是一封用中文写的测试邮件。\r\n第二行：邮件服务器应该把它编码成七位。\r\n';
const BINARY = Buffer.concat([
  Buffer.from([0x00, 0xff, 0x0d, 0x0a, 0x0a, 0x0d, 0x80, 0x2d, 0x2d]),
  randomBytes(5000),
  Buffer.from('\r\n-- not a boundary\r\n'),
]);

describe('mime-7bit: what the recipient sees does not change', () => {
  it('re-encodes Chinese UTF-8 text sent 8bit as quoted-printable', async () => {
    const { out, after } = await roundTrip(
      mime(
        'From: Alice <alice@crepes.test>',
        'To: Bob <bob@example.test>',
        'Subject: plain',
        'MIME-Version: 1.0',
        'Content-Type: text/plain; charset=utf-8',
        'Content-Transfer-Encoding: 8bit',
        '',
        CHINESE,
      ),
    );
    assert.match(out.toString(), /\r\nContent-Transfer-Encoding: quoted-printable\r\n/);
    assert.match(out.toString(), /Content-Type: text\/plain; charset=utf-8\r\n/);
    assert.equal(after.text, CHINESE.replace(/\r\n/g, '\n'));
  });

  it('keeps a Latin-1 part in its charset, as quoted-printable', async () => {
    const { out, after } = await roundTrip(
      mime(
        'From: alice@crepes.test',
        'To: bob@example.test',
        'Subject: Latin-1',
        'MIME-Version: 1.0',
        'Content-Type: text/plain; charset=iso-8859-1',
        'Content-Transfer-Encoding: 8bit',
        '',
        latin1('Grüße aus Köln, à bientôt, ¿qué tal? ½ × ÿ'),
        '',
      ),
    );
    assert.match(out.toString(), /Gr=FC=DFe aus K=F6ln/);
    assert.equal(after.text, 'Grüße aus Köln, à bientôt, ¿qué tal? ½ × ÿ\n');
  });

  it('sends binary and 8bit attachments as base64, byte for byte, with their names and types', async () => {
    const { out, after } = await roundTrip(
      mime(
        'From: alice@crepes.test',
        'To: bob@example.test',
        'Subject: attachments',
        'MIME-Version: 1.0',
        'Content-Type: multipart/mixed; boundary="outer"',
        '',
        '--outer',
        'Content-Type: text/plain; charset=utf-8',
        '',
        'See the attachments.',
        '--outer',
        'Content-Type: application/octet-stream; name="données.bin"',
        'Content-Disposition: attachment; filename="données.bin"',
        'Content-Transfer-Encoding: binary',
        '',
        BINARY,
        '--outer',
        'Content-Type: image/x-test',
        'Content-Disposition: attachment; filename="图片.raw"',
        'Content-Transfer-Encoding: 8bit',
        '',
        Buffer.from([0x89, 0x50, 0x4e, 0x47, 0xff, 0xfe, 0x20, 0x41]),
        '--outer--',
        '',
      ),
    );
    assert.equal(after.attachments.length, 2);
    assert.equal(after.attachments[0]!.filename, 'données.bin');
    assert.equal(after.attachments[0]!.sha256, createHash('sha256').update(BINARY).digest('hex'));
    assert.equal(after.attachments[1]!.filename, '图片.raw');
    assert.equal(after.attachments[1]!.contentType, 'image/x-test');
    assert.equal(out.toString().match(/Content-Transfer-Encoding: base64/g)?.length, 2);
    // The text part was 7-bit already: it is untouched, label and all.
    assert.match(out.toString(), /--outer\r\nContent-Type: text\/plain; charset=utf-8\r\n\r\nSee the/);
  });

  it('keeps multipart/alternative inside multipart/mixed', async () => {
    const html = '<p>Ça marche — <b>très</b> bien. 中文</p>';
    const { out, after } = await roundTrip(
      mime(
        'From: alice@crepes.test',
        'To: bob@example.test',
        'Subject: alternative',
        'MIME-Version: 1.0',
        'Content-Type: multipart/mixed; boundary="mixed"',
        'Content-Transfer-Encoding: 8bit',
        '',
        'This is a multi-part message. Ünïcödé preamble.',
        '--mixed',
        'Content-Type: multipart/alternative; boundary="alt"',
        '',
        '--alt',
        'Content-Type: text/plain; charset=utf-8',
        'Content-Transfer-Encoding: 8bit',
        '',
        'Ça marche — très bien. 中文',
        '--alt',
        'Content-Type: text/html; charset=utf-8',
        'Content-Transfer-Encoding: 8bit',
        '',
        html,
        '--alt--',
        '--mixed',
        'Content-Type: text/csv; charset=utf-8',
        'Content-Disposition: attachment; filename=prices.csv',
        'Content-Transfer-Encoding: 8bit',
        '',
        'item;price',
        'crêpe;3 €',
        '--mixed--',
        'Epilogue ü',
        '',
      ),
    );
    assert.equal(after.text, 'Ça marche — très bien. 中文');
    assert.equal(after.html, html);
    assert.equal(after.attachments[0]!.filename, 'prices.csv');
    const s = out.toString();
    assert.match(s, /multipart\/mixed; boundary="mixed"\r\nContent-Transfer-Encoding: 7bit\r\n/);
    assert.ok(s.indexOf('--alt\r\n') > s.indexOf('--mixed\r\n'));
    assert.equal(s.match(/quoted-printable/g)?.length, 3);
  });

  for (const disposition of ['inline', 'attachment']) {
    it(`follows a nested message/rfc822 (${disposition}) with 8-bit parts and headers`, async () => {
      const { out, after } = await roundTrip(
        mime(
          'From: alice@crepes.test',
          'To: bob@example.test',
          'Subject: Fwd: Grüße',
          'MIME-Version: 1.0',
          'Content-Type: multipart/mixed; boundary="outer"',
          '',
          '--outer',
          'Content-Type: text/plain; charset=utf-8',
          'Content-Transfer-Encoding: 8bit',
          '',
          'Weitergeleitet – siehe unten.',
          '--outer',
          'Content-Type: message/rfc822',
          `Content-Disposition: ${disposition}`,
          'Content-Transfer-Encoding: 8bit',
          '',
          'From: Zoë Müller <zoe@example.test>',
          'To: 李雷 <li@example.test>',
          'Subject: 原始邮件 – Grüße',
          'MIME-Version: 1.0',
          'Content-Type: multipart/mixed; boundary="inner"',
          '',
          '--inner',
          'Content-Type: text/plain; charset=utf-8',
          'Content-Transfer-Encoding: 8bit',
          '',
          CHINESE,
          '--inner',
          'Content-Type: application/octet-stream',
          'Content-Disposition: attachment; filename="inner.bin"',
          'Content-Transfer-Encoding: binary',
          '',
          BINARY,
          '--inner--',
          '',
          '--outer--',
          '',
        ),
      );
      const binary = createHash('sha256').update(BINARY).digest('hex');
      if (disposition === 'attachment') {
        const inner = after.attachments[0]!.message!;
        assert.equal(inner.subject, '原始邮件 – Grüße');
        assert.deepEqual(inner.from, [{ name: 'Zoë Müller', address: 'zoe@example.test' }]);
        assert.equal(inner.text, CHINESE.replace(/\r\n/g, '\n'));
        assert.equal(inner.attachments[0]!.sha256, binary);
      } else {
        // An inline message is shown within the text, its attachments among the message's own.
        assert.match(after.text!, /Zoë Müller[^]*原始邮件 – Grüße[^]*这是一封用中文写的测试邮件/);
        assert.equal(after.attachments[0]!.filename, 'inner.bin');
        assert.equal(after.attachments[0]!.sha256, binary);
      }
      // Still a message/rfc822 part, now 7bit as RFC 2046 §5.2.1 wants it, with its own headers inside.
      assert.match(
        out.toString(),
        /Content-Type: message\/rfc822\r\n[^]*?Content-Transfer-Encoding: 7bit\r\n\r\nFrom: /,
      );
    });
  }

  it('turns an 8-bit Subject and From display name into encoded words', async () => {
    const { out, after } = await roundTrip(
      mime(
        'From: "Jöhn Dœ, Jr." <john@example.test>',
        'To: 张三 <zhang@example.test>, "Plain Name" <plain@example.test>',
        'Subject: Grüße — 你好，世界！ and a longer tail to make the line fold over the limit',
        'X-Comment: naïve',
        'MIME-Version: 1.0',
        'Content-Type: text/plain; charset=utf-8',
        'Content-Transfer-Encoding: 7bit',
        '',
        'ASCII body.',
        '',
      ),
    );
    assert.equal(
      after.subject,
      'Grüße — 你好，世界！ and a longer tail to make the line fold over the limit',
    );
    assert.deepEqual(after.from, [{ name: 'Jöhn Dœ, Jr.', address: 'john@example.test' }]);
    assert.deepEqual(after.to, [
      { name: '张三', address: 'zhang@example.test' },
      { name: 'Plain Name', address: 'plain@example.test' },
    ]);
    const s = out.toString();
    assert.match(s, /^From: =\?UTF-8\?Q\?J=C3=B6hn_D=C5=93=2C_Jr=2E\?= <john@example\.test>\r\n/);
    assert.match(s, /"Plain Name"\r\n <plain@example\.test>/);
    assert.match(s, /\r\nX-Comment: =\?UTF-8\?Q\?na=C3=AFve\?=\r\n/);
    // The body was 7-bit: it is not re-encoded.
    assert.match(s, /\r\n\r\nASCII body\.\r\n$/);
  });

  it('reads 8-bit header text that is not UTF-8 in the charset of its part', async () => {
    const out = await transform(
      mime(
        latin1('Subject: Grüße aus Köln'),
        latin1('From: Jürgen <j@example.test>'),
        'Content-Type: text/plain; charset=iso-8859-1',
        'Content-Transfer-Encoding: 8bit',
        '',
        latin1('Schöne Grüße'),
        '',
      ),
    );
    assertSevenBit(out);
    const m = await digest(out);
    assert.equal(m.subject, 'Grüße aus Köln');
    assert.deepEqual(m.from, [{ name: 'Jürgen', address: 'j@example.test' }]);
    assert.equal(m.text, 'Schöne Grüße\n');
  });
});

describe('mime-7bit: when it leaves a message alone', () => {
  const SEVEN = mime(
    'From: Alice <alice@crepes.test>',
    'To: bob@example.test',
    'Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=',
    'MIME-Version: 1.0',
    'Content-Type: multipart/mixed; boundary="b"',
    '',
    '--b',
    'Content-Type: text/plain; charset=utf-8',
    'Content-Transfer-Encoding: quoted-printable',
    '',
    'Gr=C3=BC=C3=9Fe',
    '--b',
    'Content-Type: application/octet-stream',
    'Content-Transfer-Encoding: base64',
    '',
    randomBytes(3000).toString('base64').replace(/.{76}/g, '$&\r\n'),
    '--b--',
    '',
  );

  it('passes a 7-bit message byte for byte', async () => {
    assert.ok((await transform(SEVEN)).equals(SEVEN));
  });

  it('passes a large 7-bit message byte for byte (past the first look, through the parser)', async () => {
    const big = mime(
      'From: alice@crepes.test',
      'Subject: big',
      'Content-Type: multipart/mixed; boundary="b"',
      '',
      '--b',
      'Content-Type: text/plain',
      '',
      'Short text.',
      '--b',
      'Content-Type: application/octet-stream',
      'Content-Transfer-Encoding: base64',
      '',
      randomBytes(600_000).toString('base64').replace(/.{76}/g, '$&\r\n'),
      '--b--',
      '',
    );
    assert.ok((await transform(big, SEVEN_BIT, { chunk: 65536 })).equals(big));
    // 8-bit header text forces the parser; the parts stay as they were.
    const withHeader = Buffer.concat([Buffer.from('X-Note: ü\r\n'), big]);
    const out = await transform(withHeader, SEVEN_BIT, { chunk: 65536 });
    assert.ok(out.equals(Buffer.concat([Buffer.from('X-Note: =?UTF-8?Q?=C3=BC?=\r\n'), big])));
  });

  it('returns the content itself when the peer offers 8BITMIME', async () => {
    const content = Readable.from([CHINESE]);
    const hooks = await setupPlugin(mime7bit);
    assert.equal(
      await hooks.transform!({ ...context(content, EIGHT_BIT), signal: AbortSignal.timeout(1000) }),
      content,
    );
  });

  it('returns the content itself for an SMTPUTF8 message to an SMTPUTF8 peer', async () => {
    const content = Readable.from([CHINESE]);
    const hooks = await setupPlugin(mime7bit);
    const ctx = { ...context(content, UTF8, true), signal: AbortSignal.timeout(1000) };
    assert.equal(await hooks.transform!(ctx), content);
  });

  it('encodes only the header text of an SMTPUTF8 message when the peer has 8BITMIME but not SMTPUTF8', async () => {
    const message = mime(
      'From: 张三 <zhang@example.test>',
      'Subject: 你好',
      'Content-Type: text/plain; charset=utf-8',
      'Content-Transfer-Encoding: 8bit',
      '',
      CHINESE,
    );
    const out = await transform(message, EIGHT_BIT, { smtputf8: true });
    const s = out.toString();
    assert.match(s, /^From: =\?UTF-8\?Q\?=E5=BC=A0=E4=B8=89\?= <zhang@example\.test>\r\nSubject: =\?UTF-8/);
    assert.ok(s.endsWith(`Content-Transfer-Encoding: 8bit\r\n\r\n${CHINESE}`), 'the 8-bit body stays');
    assert.deepEqual(await digest(out), await digest(message));
  });

  it('re-encodes for an 8BITMIME peer when told to (always: true), keeping UTF-8 headers for SMTPUTF8', async () => {
    const message = mime('Subject: 你好', 'Content-Type: text/plain; charset=utf-8', '', CHINESE);
    const out = await transform(message, UTF8, { smtputf8: true, config: { always: true } });
    assert.ok(out.toString().startsWith('Subject: 你好\r\n'));
    assert.match(out.toString(), /Content-Transfer-Encoding: quoted-printable\r\n\r\n=E4=BD=A0/);
    assert.deepEqual(await digest(out), await digest(message));
  });

  it('refuses unknown config keys', async () => {
    await assert.rejects(setupPlugin(mime7bit, { config: { alway: true } as never }));
  });
});

describe('mime-7bit: malformed and mislabelled content is never sent 8-bit', () => {
  it('encodes a part labelled 7bit (or not labelled) that carries 8-bit octets', async () => {
    for (const label of ['Content-Transfer-Encoding: 7bit', 'X-No-Label: here']) {
      await roundTrip(
        mime('Subject: s', 'Content-Type: text/plain; charset=utf-8', label, '', 'Ärger mit 7bit', ''),
      );
    }
  });

  it('repairs raw octets in a part labelled quoted-printable, keeping what readers decode', async () => {
    const { out } = await roundTrip(
      mime(
        'Subject: s',
        'Content-Type: text/plain; charset=utf-8',
        'Content-Transfer-Encoding: quoted-printable',
        '',
        'Caf=C3=A9 und raw Käse',
        '',
      ),
    );
    assert.match(out.toString(), /Caf=C3=A9 und raw K=C3=A4se/);
  });

  it('drops stray 8-bit octets from a part labelled base64', async () => {
    const data = randomBytes(300);
    const b64 = data.toString('base64');
    await roundTrip(
      mime(
        'Subject: s',
        'Content-Type: application/octet-stream',
        'Content-Disposition: attachment; filename=x.bin',
        'Content-Transfer-Encoding: base64',
        '',
        Buffer.concat([
          Buffer.from(b64.slice(0, 100)),
          Buffer.from([0xff, 0xc3]),
          Buffer.from(b64.slice(100)),
        ]),
        '',
      ),
    );
  });

  it('wraps overlong lines: a 7bit text line of 5000 octets, a base64 line of 3000', async () => {
    const { out } = await roundTrip(
      mime(
        'Subject: s',
        'Content-Type: multipart/mixed; boundary=b',
        '',
        '--b',
        'Content-Type: text/plain',
        '',
        'x'.repeat(5000),
        '--b',
        'Content-Type: application/octet-stream',
        'Content-Disposition: attachment; filename=y.bin',
        'Content-Transfer-Encoding: base64',
        '',
        randomBytes(3000).toString('base64'),
        '--b--',
        '',
      ),
    );
    assert.match(out.toString(), /Content-Type: text\/plain\r\nContent-Transfer-Encoding: quoted-printable/);
  });

  it('base64-encodes a part with an encoding it does not know, as a whole', async () => {
    const out = await transform(
      mime(
        'Subject: s',
        'Content-Type: application/x-thing',
        'Content-Transfer-Encoding: x-strange',
        '',
        Buffer.from([0xde, 0xad, 0xbe, 0xef]),
        '',
      ),
    );
    assertSevenBit(out);
    assert.ok(out.toString().endsWith('Content-Transfer-Encoding: base64\r\n\r\n3q2+7w0K\r\n'));
  });

  it('masks 8-bit octets in a multipart whose boundary never comes (readers show no part of it)', async () => {
    const out = await transform(
      mime('Subject: s', 'Content-Type: multipart/mixed; boundary=nowhere', '', 'Text ohne Grenze: ü', ''),
    );
    assertSevenBit(out);
    assert.match(out.toString(), /Text ohne Grenze: \?\?\r\n$/);
  });

  it('handles LF-only line ends in 8-bit text', async () => {
    const out = await transform(
      Buffer.from('Subject: s\nContent-Type: text/plain; charset=utf-8\n\nZeile eins ü\nZeile zwei\n'),
    );
    assert.equal((await digest(out)).text, 'Zeile eins ü\nZeile zwei\n');
    assert.ok(!/[\x80-\xff]/.test(out.toString('latin1')));
  });

  it('sends UTF-16 text and text with NULs as base64, octet for octet', async () => {
    const utf16 = Buffer.concat([Buffer.from([0xff, 0xfe]), Buffer.from('Grüße\r\n中文\n', 'utf16le')]);
    const { out } = await roundTrip(
      mime(
        'Subject: s',
        'Content-Type: multipart/mixed; boundary=b',
        '',
        '--b',
        'Content-Type: text/plain; charset=utf-16',
        'Content-Disposition: attachment; filename=u16.txt',
        'Content-Transfer-Encoding: binary',
        '',
        utf16,
        '--b',
        'Content-Type: text/plain; charset=utf-8',
        'Content-Disposition: attachment; filename=nul.txt',
        '',
        Buffer.from('a\u0000b\rc\nd ü'),
        '--b--',
        '',
      ),
    );
    assert.equal(out.toString().match(/Content-Transfer-Encoding: base64/g)?.length, 2);
  });

  it('leaves a part labelled 8bit that holds only 7-bit data as it is', async () => {
    const message = mime(
      'Subject: Grüße',
      'Content-Type: text/plain',
      'Content-Transfer-Encoding: 8bit',
      '',
      'Only ASCII here.',
      '',
    );
    const out = await transform(message);
    assertSevenBit(out);
    assert.equal(
      out.toString(),
      'Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\nOnly ASCII here.\r\n',
    );
  });

  it('rewrites a message that is all header', async () => {
    const out = await transform(Buffer.from('Subject: nur Kopf ü\r\nFrom: a@example.test\r\n'));
    assertSevenBit(out);
    assert.equal((await digest(out)).subject, 'nur Kopf ü');
  });

  it('fails the transform (so the delivery is deferred) when the input stream fails', async () => {
    const broken = new Readable({
      read() {
        this.push(Buffer.from('Subject: ü\r\n\r\n'));
        this.destroy(new Error('disk gone'));
      },
    });
    const out = await runHook(mime7bit, 'transform', context(broken, SEVEN_BIT));
    await assert.rejects(collect(out), /disk gone/);
  });
});

describe('mime-7bit: through a real 7-bit peer (smtp-server with hide8BITMIME)', () => {
  let server: SMTPServer;
  let port: number;
  const received: Buffer[] = [];

  before(async () => {
    server = new SMTPServer({
      hide8BITMIME: true,
      hideSMTPUTF8: true,
      disabledCommands: ['STARTTLS', 'AUTH'],
      logger: false,
      onData(stream, _session, callback) {
        collect(stream).then((data) => {
          received.push(data);
          callback();
        }, callback);
      },
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.server.address() as AddressInfo).port;
  });

  after(async () => {
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  it('delivers a message the peer stores as 7-bit, and which reads the same', async () => {
    const message = mime(
      'From: "Zoë" <zoe@crepes.test>',
      'To: 李雷 <li@example.test>',
      'Subject: 你好 — Grüße',
      'MIME-Version: 1.0',
      'Content-Type: multipart/mixed; boundary="b"',
      '',
      '--b',
      'Content-Type: text/plain; charset=utf-8',
      'Content-Transfer-Encoding: 8bit',
      '',
      CHINESE,
      '.',
      '.. a line that starts with dots',
      '--b',
      'Content-Type: application/octet-stream',
      'Content-Disposition: attachment; filename="bin.dat"',
      'Content-Transfer-Encoding: binary',
      '',
      BINARY,
      '--b--',
      '',
    );
    const connection = new SMTPConnection({ host: '127.0.0.1', port, ignoreTLS: true });
    await new Promise<void>((resolve, reject) =>
      connection.connect((err) => (err ? reject(err) : resolve())),
    );
    // What the transport learns from EHLO.
    const extensions = (connection as unknown as { _supportedExtensions: string[] })._supportedExtensions;
    const peer = { eightBitMime: extensions.includes('8BITMIME'), smtputf8: extensions.includes('SMTPUTF8') };
    assert.deepEqual(peer, SEVEN_BIT);
    const content = await runHook(mime7bit, 'transform', context(Readable.from([message]), peer));
    await new Promise<void>((resolve, reject) =>
      connection.send({ from: 'zoe@crepes.test', to: ['li@example.test'] }, content, (err) =>
        err ? reject(err) : resolve(),
      ),
    );
    connection.quit();
    const stored = received.at(-1)!;
    assertSevenBit(stored);
    assert.deepEqual(await digest(stored), await digest(message));
  });

  /** Downgrades `message` for this 7-bit peer, sends it there, and returns what the peer stored. */
  async function deliver(message: Buffer): Promise<Buffer> {
    const content = await runHook(mime7bit, 'transform', context(Readable.from([message]), SEVEN_BIT));
    const connection = new SMTPConnection({ host: '127.0.0.1', port, ignoreTLS: true });
    await new Promise<void>((resolve, reject) =>
      connection.connect((err) => (err ? reject(err) : resolve())),
    );
    await new Promise<void>((resolve, reject) =>
      connection.send({ from: 'zoe@crepes.test', to: ['li@example.test'] }, content, (err) =>
        err ? reject(err) : resolve(),
      ),
    );
    connection.quit();
    const stored = received.at(-1)!;
    assertSevenBit(stored);
    return stored;
  }

  const LONG_SUBJECT = 'Grüße aus Zürich — 你好，世界！ '.repeat(3).trim();

  it("folds a long encoded Subject after its first word, and Python's email parser reads it back exactly", async (t) => {
    const stored = await deliver(mime('From: zoe@crepes.test', `Subject: ${LONG_SUBJECT}`, '', 'hällo', ''));
    const header = stored.toString('latin1').split('\r\n\r\n')[0]!;
    assert.match(header, /^Subject: =\?UTF-8\?Q\?Gr=C3=BC/m, 'the first encoded word on the first line');
    assert.ok(
      header.split('\r\n').every((l) => l.length <= 76),
      `RFC 2047 §2: lines of at most 76 characters\n${header}`,
    );
    const read = await readWithPython(t, stored);
    if (!read) return;
    assert.equal(read.subject, LONG_SUBJECT);
  });

  it("returns a bounced message whose long Subject Python's email parser reads back exactly", async (t) => {
    const original = mime(
      'From: zoe@crepes.test',
      `Subject: ${LONG_SUBJECT}`,
      'MIME-Version: 1.0',
      'Content-Type: text/plain; charset=utf-8',
      'Content-Transfer-Encoding: 8bit',
      '',
      'hällo',
      '',
    );
    const report = buildReport({
      hostname: 'mx.test',
      audience: 'sender',
      to: address('zoe@crepes.test'),
      queueId: 'Q1',
      arrivalDate: new Date(0),
      smtputf8: false,
      recipients: [
        {
          address: address('li@example.test'),
          action: 'failed',
          status: '5.1.1',
          reply: {
            code: 550,
            enhanced: '5.1.1',
            text: 'No such user',
            remote: 'mx.example.test [192.0.2.7]',
          },
          lastAttemptAt: new Date(0),
        },
      ],
      returned: { kind: 'full', content: original },
      date: new Date(0),
      messageId: 'M1',
    });
    assert.ok(report.eightBit, 'the returned message is 8-bit: the report needs the downgrade');
    const stored = await deliver(report.content);
    const read = await readWithPython(t, stored);
    if (!read) return;
    assert.equal(read.subject, 'Undelivered Mail Returned to Sender');
    assert.deepEqual(read.attached, [{ subject: LONG_SUBJECT }]);
  });
});
