const ALPHABET = '0123456789BCDFGHJKLMNPQRSTVWXYZ';
let counter = 0;
/**
 * The process id: no two processes running at once have the same, so the workers of one server
 * (which share its spool, its Maildirs and its logs) never make the same id. Five digits of base 31
 * hold every pid Linux can give (pid_max is at most 2^22).
 */
const processTag = process.pid % 31 ** 5;

function base(n: number, width: number): string {
  let s = '';
  for (let i = 0; i < width; i++) {
    s = ALPHABET[n % ALPHABET.length] + s;
    n = Math.floor(n / ALPHABET.length);
  }
  return s;
}

/**
 * A short, unique, roughly time-sortable id for sessions and transactions (like Postfix queue ids).
 * Only [0-9A-Z] without vowels, so it is safe in file names, Message-IDs and log searches.
 */
export function newId(): string {
  counter = (counter + 1) % 0x1000000;
  const ms = Date.now();
  return base(Math.floor(ms / 1000), 7) + base(ms % 1000, 2) + base(processTag, 5) + base(counter, 5);
}
