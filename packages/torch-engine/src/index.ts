export { TorchResNet, PRECISIONS, defaultThreads } from './torch-resnet.js';
export type { Precision, TorchResNetOptions } from './torch-resnet.js';
export { torchEngineStatus, buildInfo, loadAddon, TorchEngineUnavailableError, BUILD_DIR } from './addon.js';
export type { BuildInfo } from './addon.js';
export { nativeNetSpec } from './spec.js';
export { toTensorFlowLayout } from './layout.js';
