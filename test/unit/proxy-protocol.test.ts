import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { parseProxyHeader, PROXY_V2_MAX } from '../../core/smtp/proxy-protocol.js';

const SIG = Buffer.from('0d0a0d0a000d0a515549540a', 'hex');

function v2(cmd: number, fam: number, block: Buffer): Buffer {
  const head = Buffer.alloc(4);
  head[0] = 0x20 | cmd;
  head[1] = fam;
  head.writeUInt16BE(block.length, 2);
  return Buffer.concat([SIG, head, block]);
}

function ipv4Block(src: number[], dst: number[], sport: number, dport: number, extra = 0): Buffer {
  const b = Buffer.alloc(12 + extra);
  Buffer.from(src).copy(b, 0);
  Buffer.from(dst).copy(b, 4);
  b.writeUInt16BE(sport, 8);
  b.writeUInt16BE(dport, 10);
  return b;
}

describe('PROXY header parser', () => {
  it('reads a v1 TCP4 header and says how long it was', () => {
    const buf = Buffer.from('PROXY TCP4 192.0.2.7 198.51.100.1 40001 25\r\nEHLO x\r\n');
    const r = parseProxyHeader(buf);
    assert.equal(r.kind, 'header');
    if (r.kind !== 'header') return;
    assert.deepEqual(r.header.endpoints, {
      remote: { address: '192.0.2.7', port: 40001 },
      local: { address: '198.51.100.1', port: 25 },
    });
    assert.equal(buf.subarray(r.header.length).toString(), 'EHLO x\r\n');
  });

  it('reads a v1 TCP6 header', () => {
    const r = parseProxyHeader(Buffer.from('PROXY TCP6 2001:db8::7 2001:db8::1 40001 465\r\n'));
    assert.equal(r.kind === 'header' && r.header.endpoints?.remote.address, '2001:db8::7');
  });

  it('takes v1 UNKNOWN as the proxy speaking for itself', () => {
    const r = parseProxyHeader(Buffer.from('PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n'));
    assert.equal(r.kind, 'header');
    assert.equal(r.kind === 'header' && r.header.endpoints, null);
  });

  it('waits for more octets while a header may still come', () => {
    assert.equal(parseProxyHeader(Buffer.from('PRO')).kind, 'incomplete');
    assert.equal(parseProxyHeader(Buffer.from('PROXY TCP4 192.0.2.7')).kind, 'incomplete');
    assert.equal(parseProxyHeader(SIG.subarray(0, 7)).kind, 'incomplete');
    const whole = v2(1, 0x11, ipv4Block([192, 0, 2, 7], [198, 51, 100, 1], 40001, 25));
    assert.equal(parseProxyHeader(whole.subarray(0, whole.length - 1)).kind, 'incomplete');
  });

  it('refuses what is not a PROXY header, and malformed v1 fields', () => {
    for (const text of [
      'EHLO client.test\r\n',
      'PROXY TCP4 192.0.2.7 198.51.100.1 40001\r\n',
      'PROXY TCP4 999.0.2.7 198.51.100.1 40001 25\r\n',
      'PROXY TCP4 2001:db8::7 198.51.100.1 40001 25\r\n',
      'PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n',
      'PROXY TCP4 192.0.2.7 198.51.100.1 040001 25\r\n',
      'PROXY TCP4  192.0.2.7 198.51.100.1 40001 25\r\n',
      'PROXY UDP4 192.0.2.7 198.51.100.1 40001 25\r\n',
    ]) {
      assert.equal(parseProxyHeader(Buffer.from(text)).kind, 'invalid', JSON.stringify(text));
    }
  });

  it('refuses a v1 header longer than 107 octets, with or without its CRLF', () => {
    const long = `PROXY UNKNOWN ${'x'.repeat(100)}`;
    assert.equal(parseProxyHeader(Buffer.from(long)).kind, 'invalid');
    assert.equal(parseProxyHeader(Buffer.from(`${long}\r\n`)).kind, 'invalid');
  });

  it('reads a v2 PROXY header over IPv4, skipping TLVs', () => {
    const buf = Buffer.concat([
      v2(1, 0x11, ipv4Block([192, 0, 2, 7], [198, 51, 100, 1], 40001, 25, 7)),
      Buffer.from('EHLO'),
    ]);
    const r = parseProxyHeader(buf);
    assert.equal(r.kind, 'header');
    if (r.kind !== 'header') return;
    assert.equal(r.header.version, 2);
    assert.deepEqual(r.header.endpoints?.remote, { address: '192.0.2.7', port: 40001 });
    assert.equal(buf.subarray(r.header.length).toString(), 'EHLO');
  });

  it('reads a v2 PROXY header over IPv6 in canonical text form', () => {
    const block = Buffer.alloc(36);
    Buffer.from('20010db8000000000000000000000007', 'hex').copy(block, 0);
    Buffer.from('20010db8000000000000000000000001', 'hex').copy(block, 16);
    block.writeUInt16BE(40001, 32);
    block.writeUInt16BE(25, 34);
    const r = parseProxyHeader(v2(1, 0x21, block));
    assert.equal(r.kind === 'header' && r.header.endpoints?.remote.address, '2001:db8::7');
    assert.equal(r.kind === 'header' && r.header.endpoints?.local.address, '2001:db8::1');
  });

  it('takes v2 LOCAL as a health check that keeps the real peer', () => {
    const r = parseProxyHeader(v2(0, 0x00, Buffer.alloc(0)));
    assert.equal(r.kind, 'header');
    assert.equal(r.kind === 'header' && r.header.endpoints, null);
  });

  it('refuses a bad v2 version, command, short block, datagram transport or oversize length', () => {
    const good = v2(1, 0x11, ipv4Block([192, 0, 2, 7], [198, 51, 100, 1], 1, 25));
    const badVersion = Buffer.from(good);
    badVersion[12] = 0x11;
    const badCommand = Buffer.from(good);
    badCommand[12] = 0x22;
    const huge = Buffer.concat([SIG, Buffer.from([0x21, 0x11, 0xff, 0xff])]);
    for (const [what, buf] of [
      ['version', badVersion],
      ['command', badCommand],
      ['short block', v2(1, 0x11, Buffer.alloc(8))],
      ['datagram', v2(1, 0x12, ipv4Block([192, 0, 2, 7], [198, 51, 100, 1], 1, 25))],
      ['length', huge],
    ] as const) {
      const r = parseProxyHeader(buf);
      assert.equal(r.kind, 'invalid', what);
    }
    assert.ok(huge.length < PROXY_V2_MAX, 'the oversize length is refused before its octets arrive');
  });
});
