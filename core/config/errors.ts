import type { z } from 'zod';

/**
 * A configuration problem, reported as `file: key: what was expected`. Startup stops on it with a
 * non-zero exit; a reload that meets it keeps the running config.
 */
export class ConfigError extends Error {
  constructor(
    readonly file: string,
    readonly problems: readonly { key: string; expected: string }[],
  ) {
    super(problems.map((p) => `${file}: ${p.key}: ${p.expected}`).join('\n'));
    this.name = 'ConfigError';
  }

  static one(file: string, key: string, expected: string): ConfigError {
    return new ConfigError(file, [{ key, expected }]);
  }
}

/** `['listeners', 0, 'port']` → `listeners[0].port`. */
export function formatPath(path: readonly PropertyKey[], prefix = ''): string {
  let out = prefix;
  for (const part of path) {
    if (typeof part === 'number') out += `[${part}]`;
    else out += out ? `.${String(part)}` : String(part);
  }
  return out || '(top level)';
}

function describeIssue(issue: z.core.$ZodIssue): string {
  switch (issue.code) {
    case 'unrecognized_keys':
      return `unknown key${issue.keys.length > 1 ? 's' : ''} ${issue.keys.map((k) => `"${k}"`).join(', ')}`;
    case 'invalid_type':
      return `expected ${issue.expected}${/received undefined$/.test(issue.message) ? ' (missing)' : ''}`;
    case 'invalid_value':
      return `expected one of ${issue.values.map((v) => JSON.stringify(v)).join(', ')}`;
    case 'too_small':
      return issue.origin === 'array'
        ? `expected at least ${String(issue.minimum)} item(s)`
        : issue.origin === 'string'
          ? 'expected a non-empty string'
          : `expected a value of at least ${String(issue.minimum)}`;
    case 'too_big':
      return `expected a value of at most ${String(issue.maximum)}`;
    case 'invalid_union': {
      // A discriminated union (the listener kinds) names its options; the plugin entry does not.
      const options = (issue as { options?: readonly unknown[] }).options;
      return options
        ? `expected one of ${options.map((v) => JSON.stringify(v)).join(', ')}`
        : 'expected a plugin name or path, or { name, config }';
    }
    default:
      return issue.message.startsWith('expected') ? issue.message : `expected ${issue.message}`;
  }
}

export function zodToConfigError(file: string, error: z.ZodError, prefix = ''): ConfigError {
  return new ConfigError(
    file,
    error.issues.map((issue) => {
      const path = issue.code === 'unrecognized_keys' ? issue.path : issue.path;
      return { key: formatPath(path, prefix), expected: describeIssue(issue) };
    }),
  );
}
