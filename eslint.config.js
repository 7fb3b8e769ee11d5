// @ts-check
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

/** `..` repeated `n` times: how a file `n` folders deep reaches the repository root. */
const up = (n) => Array.from({ length: n }, () => '..').join('/');

// The core knows SMTP and nothing about plugins: no file under core/ imports from plugins/.
// Relative paths only mean plugins/ at the right depth, hence one block per depth
// (test/unit/layering.test.ts checks the same by resolving every import).
const coreKnowsNoPlugins = [1, 2, 3, 4].map((depth) => ({
  files: [
    `core/${Array(depth - 1)
      .fill('*/')
      .join('')}*.ts`,
  ],
  rules: {
    'no-restricted-imports': [
      'error',
      {
        patterns: [
          {
            group: [`${up(depth)}/plugins`, `${up(depth)}/plugins/**`],
            message:
              'core/ must not import plugins/: a plugin contributes to the core (hooks, commands, services).',
          },
        ],
      },
    ],
  },
}));

// Built-in plugins use exactly what a plugin installed from npm can: the public API (`petrel`,
// here core/index.js), and of other plugins only their
// published contracts (`petrel/queue` = queue/api.js, `petrel/users` = users/directory.js,
// `petrel/mailauth` = mailauth/api.js, `petrel/dnsbl` = dnsbl/api.js,
// `petrel/hygiene` = hygiene/api.js,
// `petrel/clamav` = clamav/api.js,
// `petrel/rspamd` = rspamd/api.js, `petrel/spamassassin` = spamassassin/api.js).
// Their own tests may look deeper.
const publicApiOnly = {
  files: ['plugins/**/*.ts'],
  // Tests, and the test support outbound's tests share, may look deeper.
  ignores: ['plugins/**/*.test.ts', 'plugins/outbound/test-support.ts'],
  rules: {
    'no-restricted-imports': [
      'error',
      {
        patterns: [
          {
            group: ['../../core/**', '!../../core/index.js'],
            message: "Plugins import only the public API: 'petrel' (../../core/index.js in this repository).",
          },
          {
            group: [
              '../*/**',
              '!../../**',
              '!../queue/api.js',
              '!../users/directory.js',
              '!../mailauth/api.js',
              '!../dnsbl/api.js',
              '!../hygiene/api.js',
              '!../clamav/api.js',
              '!../rspamd/api.js',
              '!../spamassassin/api.js',
            ],
            message:
              "Another plugin's internals are not an API: use its published contract (petrel/queue, petrel/users, petrel/mailauth, petrel/dnsbl, petrel/hygiene, petrel/clamav, petrel/rspamd, petrel/spamassassin) or the public API.",
          },
        ],
      },
    ],
  },
};

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', 'var/**', 'test/fixtures/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    files: ['**/*.ts'],
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      '@typescript-eslint/no-empty-object-type': 'off',
      'no-control-regex': 'off',
    },
  },
  ...coreKnowsNoPlugins,
  publicApiOnly,
  {
    files: ['**/*.js', '**/*.mjs'],
    languageOptions: { globals: { process: 'readonly', console: 'readonly' } },
  },
);
