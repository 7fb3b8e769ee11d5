import { after, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, writeFileSync } from 'node:fs';
import { definePlugin, z } from 'petrel';
import { petrel, Project } from './cli.js';
import { describeRun } from './run.js';

/**
 * A third-party plugin in a user's project, outside this repository, importing only `petrel`.
 * Its setup leaves a mark on disk: a command must never run it.
 */
const GREETER = `
import { writeFileSync } from 'node:fs';
import { CommandError, definePlugin, z } from 'petrel';

export default definePlugin({
  name: 'greeter',
  config: z.object({ greeting: z.string().default('Hello'), limit: z.number().int().default(3) }),
  setup({ baseDir }) {
    writeFileSync(baseDir + '/setup-ran', 'yes');
    return {};
  },
  commands: {
    greet: {
      description: 'greets whoever is named (petrel greet NAME...)',
      async run(cli) {
        const names = cli.args.filter((a, i) => !a.startsWith('-') && cli.args[i - 1] !== '--config');
        if (names.length === 0) throw new CommandError('nobody to greet', 2);
        if (names.includes('nobody')) cli.exit(5);
        if (names.length > cli.config.limit) throw new CommandError('too many names', 3);
        for (const n of names) cli.stdout.write(cli.config.greeting + ', ' + n + '\\n');
        cli.stderr.write('config ' + cli.configFile + ' entry ' + cli.entry?.key + ' host ' + cli.petrel.hostname + '\\n');
        return 0;
      },
    },
  },
});
`;

/** A second plugin contributing the same command name. */
const RIVAL = GREETER.replace("name: 'greeter'", "name: 'rival'");

describe('commands from plugins, through the real CLI', () => {
  const project = new Project([]);
  writeFileSync(project.path('plugins-local', 'greeter.ts'), GREETER);
  writeFileSync(project.path('plugins-local', 'rival.ts'), RIVAL);
  const base = { hostname: 'mx.greeter.test', listeners: [{ kind: 'smtp', port: 0 }] };
  const config = project.writeConfig('petrel.config.yaml', {
    ...base,
    plugins: [{ name: './plugins-local/greeter.ts', config: { greeting: 'Ahoy' } }, 'users'],
  });
  after(() => project.remove());

  it('petrel greet runs the plugin command with its validated config, and never its setup', async () => {
    const r = await petrel(['greet', 'alice', 'bob'], project.dir);
    assert.equal(r.code, 0, describeRun(r));
    assert.equal(r.stdout, 'Ahoy, alice\nAhoy, bob\n');
    assert.match(r.stderr, new RegExp(`config ${config} entry plugins\\[0\\] host mx\\.greeter\\.test`));
    assert.ok(!existsSync(project.path('setup-ran')), 'setup did not run');
  });

  it('the exit code comes from the handler: CommandError prints its message, exit() ends quietly', async () => {
    let r = await petrel(['greet'], project.dir);
    assert.equal(r.code, 2, describeRun(r));
    assert.equal(r.stderr, 'petrel greet: nobody to greet\n');
    r = await petrel(['greet', 'a', 'b', 'c', 'd'], project.dir);
    assert.equal(r.code, 3, describeRun(r));
    r = await petrel(['greet', 'nobody'], project.dir);
    assert.equal(r.code, 5, describeRun(r));
    assert.equal(r.stderr, '');
  });

  it('--config FILE chooses the config the command, and the plugin list, come from', async () => {
    const other = project.writeConfig('other.yaml', { ...base, plugins: ['users'] });
    const r = await petrel(['greet', 'alice', '--config', other], project.dir);
    assert.equal(r.code, 64, describeRun(r));
    assert.match(r.stderr, /unknown command "greet alice --config/);
  });

  it('petrel --help lists the core commands and each configured plugin command with its line', async () => {
    const r = await petrel(['--help'], project.dir);
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /^ {2}plugin new NAME +create the folder NAME/m);
    assert.match(r.stdout, /^ {2}greet +greets whoever is named \(petrel greet NAME\.\.\.\) \[greeter\]$/m);
    assert.match(r.stdout, /^ {2}user +add, change, remove and list the users plugin's users/m);
    assert.doesNotMatch(r.stdout, /^ {2}queue /m, 'the queue plugin is not configured here');
    const help = await petrel(['help'], project.dir);
    assert.equal(help.stdout, r.stdout);
  });

  it('a bad plugin entry is a config error naming the key (exit 78)', async () => {
    const bad = project.writeConfig('bad.yaml', {
      ...base,
      plugins: [{ name: './plugins-local/greeter.ts', config: { limit: 'many' } }],
    });
    const r = await petrel(['greet', 'x', '--config', bad], project.dir);
    assert.equal(r.code, 78, describeRun(r));
    assert.match(r.stderr, /plugins\[0\] \(greeter\)\.config\.limit/);
  });

  it('two configured plugins that contribute one command name are refused (exit 78)', async () => {
    const both = project.writeConfig('both.yaml', {
      ...base,
      plugins: ['./plugins-local/greeter.ts', './plugins-local/rival.ts'],
    });
    const r = await petrel(['greet', 'x', '--config', both], project.dir);
    assert.equal(r.code, 78, describeRun(r));
    assert.match(r.stderr, /plugins\[1\] \(rival\).*"greet" is also a command of plugins\[0\] \(greeter\)/);
  });
});

describe('definePlugin commands', () => {
  const setup = () => ({});
  const run = async () => 0;
  it('refuses the names of the core commands, odd names and a missing description', () => {
    assert.throws(
      () => definePlugin({ name: 'x', setup, commands: { start: { description: 'mine', run } } }),
      /one of petrel's own/,
    );
    assert.throws(
      () => definePlugin({ name: 'x', setup, commands: { 'Do It': { description: 'mine', run } } }),
      /lower-case letters/,
    );
    assert.throws(
      () => definePlugin({ name: 'x', setup, commands: { go: { description: 'two\nlines', run } } }),
      /one line/,
    );
    const ok = definePlugin({
      name: 'x',
      config: z.object({}),
      setup,
      commands: { go: { description: 'goes', run } },
    });
    assert.equal(ok.commands?.go?.description, 'goes');
  });
});
