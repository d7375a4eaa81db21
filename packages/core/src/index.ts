export { describeResNet, validateConfig, ModelConfigError, TUTORIAL_CONFIG } from './architecture.js';
export type { Architecture, ParamSpec, LayerSummary, ResNetConfig } from './architecture.js';
export { ResNet, BN_MOMENTUM } from './resnet.js';
export type { Batch, StepResult, ResNetOptions } from './resnet.js';
export { Sgd } from './sgd.js';
export type { SgdOptions } from './sgd.js';
export { makeConv2d, conv2dReference } from './conv.js';
export type { ConvSpec } from './conv.js';
