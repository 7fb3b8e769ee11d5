import type { Writable } from 'node:stream';

/** Bad arguments: the subcommand prints its usage and exits 64 (EX_USAGE). */
export class UsageError extends Error {}

/** A refusal the user should read: printed as is, with its exit code (1 unless said). */
export class CommandError extends Error {
  constructor(
    message: string,
    readonly code = 1,
  ) {
    super(message);
  }
}

/**
 * Runs a `petrel <name> …` subcommand: usage errors print the usage and return 64, command errors
 * print their message and return their code; anything else (a ConfigError, a bug) propagates.
 */
export async function runSubcommand(
  name: string,
  usage: string,
  stderr: Writable,
  body: () => Promise<number>,
): Promise<number> {
  try {
    return await body();
  } catch (err) {
    if (err instanceof UsageError) {
      stderr.write(`petrel ${name}: ${err.message}\n\n${usage}\n`);
      return 64;
    }
    if (err instanceof CommandError) {
      stderr.write(`petrel ${name}: ${err.message}\n`);
      return err.code;
    }
    throw err;
  }
}
