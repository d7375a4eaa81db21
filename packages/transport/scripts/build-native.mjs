#!/usr/bin/env node
// Builds native/shm.c (the mmap behind the ring's shared-memory links, src/shm.ts).
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildNativeAddon } from '../../../tools/build-native-addon.mjs';

buildNativeAddon({
  pkg: join(dirname(fileURLToPath(import.meta.url)), '..'),
  target: 'dtrain_shm',
  sources: ['shm.c'],
  missing: 'Training still works; links between processes on one host then use sockets (slower).',
});
