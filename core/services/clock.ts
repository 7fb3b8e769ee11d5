import { injectable } from 'tsyringe';

/** Time, behind a service so that tests of schedules can move it. */
@injectable()
export class Clock {
  now(): Date {
    return new Date();
  }

  nowMs(): number {
    return Date.now();
  }
}
