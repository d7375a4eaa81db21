/**
 * Errors a user can hit while getting or reading data. Each has a literal `code` (the CLI prints one
 * line for coded errors instead of a stack) and a message that names the file or URL and what to do.
 */
export abstract class DataError extends Error {
  abstract readonly code: string;
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

export class DataFileMissingError extends DataError {
  readonly code = 'DATA_FILE_MISSING' as const;
  constructor(readonly file: string, hint: string) {
    super(`${file} does not exist. ${hint}`);
  }
}

export class DataFileSizeError extends DataError {
  readonly code = 'DATA_FILE_SIZE' as const;
  constructor(readonly file: string, detail: string, hint: string) {
    super(`${file}: ${detail}. ${hint}`);
  }
}

export class DataLabelError extends DataError {
  readonly code = 'DATA_BAD_LABEL' as const;
  constructor(readonly file: string, detail: string, hint: string) {
    super(`${file}: ${detail}. ${hint}`);
  }
}

export class DataFormatError extends DataError {
  readonly code = 'DATA_BAD_FORMAT' as const;
  constructor(readonly file: string, detail: string, hint: string) {
    super(`${file}: ${detail}. ${hint}`);
  }
}

export class ChecksumMismatchError extends DataError {
  readonly code = 'DATA_CHECKSUM_MISMATCH' as const;
  constructor(readonly url: string, readonly expected: string, readonly actual: string, hint: string) {
    super(`download of ${url} has MD5 ${actual}, expected ${expected}; the file was deleted. ${hint}`);
  }
}

export class DownloadError extends DataError {
  readonly code = 'DATA_DOWNLOAD_FAILED' as const;
  constructor(readonly url: string, detail: string, hint: string, options?: { cause?: unknown }) {
    super(`could not download ${url}: ${detail}. ${hint}`, options);
  }
}

export class DatasetArgumentError extends DataError {
  readonly code = 'DATA_BAD_ARGUMENT' as const;
  constructor(message: string) {
    super(message);
  }
}
