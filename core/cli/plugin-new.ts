import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { CommandError, UsageError } from './command.js';

export const PLUGIN_NEW_USAGE = `Usage: petrel plugin new <name>

Creates the folder <name> in the working directory with a plugin to start from:
  <name>/index.ts        the plugin (definePlugin, a config schema and one hook), importing only petrel
  <name>/index.test.ts   its test on petrel/testing, which passes as generated
  <name>/README.md       what it does, how to enable it, how to run its test

The name is what the config and the logs call it: lower-case letters, digits and dashes.`;

function indexTs(name: string): string {
  return `import { definePlugin, deny, proceed, z } from 'petrel';

/**
 * ${name} — refuses mail to the domains its config lists (an example to replace with your own).
 * Enable it in the config with: plugins: [{ name: ./${name}/index.ts, config: { blockedDomains: [spam.test] } }]
 */
export default definePlugin({
  name: '${name}',
  config: z.object({
    /** Recipient domains refused at RCPT with 550 5.7.1. */
    blockedDomains: z.array(z.string().min(1)).default([]),
  }),
  setup({ config, log }) {
    const blocked = new Set(config.blockedDomains.map((d) => d.toLowerCase()));
    return {
      async rcpt({ session, recipient }) {
        if (!blocked.has(recipient.domain.toLowerCase())) return proceed();
        log.info({ session: session.id, rcpt: recipient.address }, 'recipient domain blocked');
        return deny(550, '5.7.1', 'Mail to this domain is not accepted here');
      },
    };
  },
});
`;
}

function indexTestTs(name: string): string {
  return `import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { address, runHook, session, transaction } from 'petrel/testing';
import plugin from './index.ts';

describe('${name}', () => {
  it('refuses a recipient in a blocked domain with 550 5.7.1', async () => {
    const verdict = await runHook(
      plugin,
      'rcpt',
      { session: session(), transaction: transaction(), recipient: address('bob@spam.test'), params: {} },
      { config: { blockedDomains: ['spam.test'] } },
    );
    assert.equal(verdict.kind, 'deny');
    assert.equal(verdict.kind === 'deny' && verdict.reply.code, 550);
  });

  it('lets other recipients through to the next plugin', async () => {
    const verdict = await runHook(
      plugin,
      'rcpt',
      { session: session(), transaction: transaction(), recipient: address('bob@example.test'), params: {} },
      { config: { blockedDomains: ['spam.test'] } },
    );
    assert.equal(verdict.kind, 'proceed');
  });
});
`;
}

function readme(name: string): string {
  return `# ${name}

A Petrel plugin. As generated, it refuses mail to the recipient domains its config lists, at RCPT
with \`550 5.7.1\`; replace the hook with your own (docs/hooks.md lists them all).

## Enable it

In the Petrel config, with a path relative to the config file:

\`\`\`yaml
plugins:
  - name: ./${name}/index.ts
    config:
      blockedDomains: [spam.test]
\`\`\`

\`petrel config check\` validates the entry against the plugin's schema; \`petrel start\` runs it.
Petrel loads the TypeScript file as it is (Node's type stripping): no build step. Inside a running
server, \`import … from 'petrel'\` resolves to the server's own API wherever the file is.

## Test it

The test uses \`petrel/testing\` and Node's own test runner. Outside a server, \`petrel\` must be
installed where Node finds it: run the test in a project that depends on Petrel
(\`npm install petrel\`, or \`npm link petrel\` for a checkout), with Node 24 or later:

\`\`\`sh
node --test ${name}/index.test.ts
\`\`\`
`;
}

/** `petrel plugin new <name>`: writes the three files into `<cwd>/<name>/`, or refuses. */
export async function pluginNew(args: readonly string[], cwd: string): Promise<string> {
  const [name, ...extra] = args;
  if (!name) throw new UsageError('new needs a name');
  if (extra.length) throw new UsageError(`unexpected argument "${extra[0]}"`);
  if (!/^[a-z][a-z0-9-]*$/.test(name))
    throw new UsageError(`a plugin name is lower-case letters, digits and dashes, got "${name}"`);
  const dir = resolve(cwd, name);
  if (existsSync(dir)) throw new CommandError(`${dir} already exists; choose another name or remove it`, 73);
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'index.ts'), indexTs(name), { flag: 'wx' });
  await writeFile(join(dir, 'index.test.ts'), indexTestTs(name), { flag: 'wx' });
  await writeFile(join(dir, 'README.md'), readme(name), { flag: 'wx' });
  return dir;
}
