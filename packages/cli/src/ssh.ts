// The ssh command lines `launch --hosts` runs: the user's own ssh, with their keys and
// ~/.ssh/config, never a password prompt (BatchMode), and bounded waits (ConnectTimeout,
// keepalives), as horovodrun and mpirun's rsh launcher do.

export interface SshSettings {
  port?: number;
  identity?: string;
  /** An ssh config file instead of ~/.ssh/config (ssh -F). */
  config?: string;
  connectTimeoutS: number;
}

/** `word` quoted for a POSIX shell (the remote side runs the command through the user's shell). */
export function shellWord(word: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

/** Options common to every ssh this launcher runs. */
export function sshOptions(s: SshSettings): string[] {
  return [
    ...(s.config !== undefined ? ['-F', s.config] : []),
    ...(s.port !== undefined ? ['-p', String(s.port)] : []),
    ...(s.identity !== undefined ? ['-i', s.identity] : []),
    '-o', 'BatchMode=yes',
    '-o', `ConnectTimeout=${s.connectTimeoutS}`,
    // A host that vanishes mid-run is noticed by ssh too, not only by the run's heartbeats.
    '-o', 'ServerAliveInterval=5',
    '-o', 'ServerAliveCountMax=3',
  ];
}

/** Checks that `host` accepts the user's key, before anything starts. */
export function sshProbeArgv(host: string, s: SshSettings): string[] {
  return [...sshOptions(s), host, 'true'];
}

/**
 * Runs `argv` in `dir` on `host`. -tt gives it a terminal: when this ssh ends (the launcher
 * stopped or was killed), the remote side hangs up and the command and its workers get SIGHUP.
 */
export function sshRunArgv(host: string, dir: string, argv: string[], s: SshSettings): string[] {
  return [...sshOptions(s), '-tt', host, `cd ${shellWord(dir)} && exec ${argv.map(shellWord).join(' ')}`];
}
