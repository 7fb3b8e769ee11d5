import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { inject, injectable } from 'tsyringe';
import type { PetrelConfig } from '../config/schema.js';
import { Tokens } from '../di/tokens.js';
import { SpooledBody } from './body.js';

/**
 * The receiving spool: where bodies that outgrow memory are written while a session receives
 * them (`<spool.dir>/incoming/`). A queue plugin that takes ownership moves the file elsewhere;
 * whatever is left here belongs to no one and is removed at the end of the transaction.
 */
@injectable()
export class Spool {
  readonly dir: string;
  readonly incomingDir: string;
  private readonly threshold: number;

  constructor(@inject(Tokens.Config) config: PetrelConfig & { baseDir?: string }) {
    this.dir = resolve(config.spool.dir);
    this.incomingDir = join(this.dir, 'incoming');
    this.threshold = config.spool.memoryThreshold;
    mkdirSync(this.incomingDir, { recursive: true, mode: 0o700 });
  }

  createBody(id: string): SpooledBody {
    return new SpooledBody(this.incomingDir, `${id}.eml`, this.threshold);
  }
}
