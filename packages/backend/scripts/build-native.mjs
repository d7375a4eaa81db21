#!/usr/bin/env node
// Builds native/loader.c (holds back TensorFlow's start-up log while it loads, src/quiet-load.ts).
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildNativeAddon } from '../../../tools/build-native-addon.mjs';

buildNativeAddon({
  pkg: join(dirname(fileURLToPath(import.meta.url)), '..'),
  target: 'dtrain_loader',
  sources: ['loader.c'],
  missing: "Everything works; every process then prints TensorFlow's start-up log lines.",
});
