// The training engine over libtorch, as plain C++: no N-API and no torch headers here, so the
// binding (binding.cc) compiles in seconds and only engine.cc pays for ATen's headers.
//
// Flat vectors follow the network description's parameter order (Architecture.params). Inside
// the engine each tensor has PyTorch's layout (conv weights [out, in, kh, kw], stored as
// channels-last [out, kh, kw, in] when that memory format is on); weights, momentum and
// BatchNorm statistics are read and written in TensorFlow's layouts (the checkpoint format),
// while gradients stay in the engine's layout: the all-reduce only sums them, and a bucket is
// then one plain copy.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace dtrain {

struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;  // TensorFlow layout: conv [kh, kw, in, out], dense [in, out]
  int64_t offset = 0, size = 0;
  std::string init;  // "xavier-uniform" | "zeros" | "ones"
  double fanIn = 0, fanOut = 0;
};

struct ConvSpec {
  std::string name;
  int kernel = 0, stride = 1, padding = 0;
  int weight = -1, bias = -1;  // parameter indices; bias -1: none
};

struct BnSpec {
  std::string name;
  int64_t channels = 0;
  double eps = 0;
  int gamma = -1, beta = -1;
  int64_t statOffset = 0;  // running mean at statOffset, running variance after it
};

struct BlockSpec {
  std::string name;
  ConvSpec conv1, conv2, shortcut;
  BnSpec bn1, bn2;
  bool hasShortcut = false;
};

struct NetSpec {
  int64_t inChannels = 0, classes = 0, imageSize = 0;
  ConvSpec stemConv;
  BnSpec stemBn;
  std::vector<BlockSpec> blocks;
  int fcWeight = -1, fcBias = -1;
  double bnMomentum = 0.1;
  std::vector<ParamSpec> params;
  int64_t paramCount = 0, bnStatCount = 0;
};

/** torch.optim.SGD's settings that stay fixed for a run (dampening 0); the lr changes per step. */
struct SgdOptions {
  double momentum = 0, weightDecay = 0;
  bool nesterov = false;
  bool skipNormBiasDecay = false;  // no decay of 1-D tensors (biases, BatchNorm scale and shift)
};

struct EngineOptions {
  std::string device = "cpu";        // "cpu" or "cuda[:i]"
  int threads = 0;                   // intra-op threads; 0: libtorch's default
  std::string precision = "fp32";    // "fp32" | "tf32" | "bf16"
  bool channelsLast = false;
  uint64_t seed = 0;
  SgdOptions sgd;
  double labelSmoothing = 0;         // of the training loss, as CrossEntropyLoss(label_smoothing)
};

struct StepResult {
  double loss = 0;
  int64_t correct = 0;
};

/** What engine.cc throws: one line naming the layer and the operation (or the device and batch). */
struct EngineError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Engine {
 public:
  static std::unique_ptr<Engine> create(const NetSpec& spec, const EngineOptions& options);
  virtual ~Engine() = default;

  /**
   * Forward and backward of the mean cross-entropy (label-smoothed per the options) on a batch of NHWC images. Each parameter's
   * gradient is copied into `grads` (engine layout) as soon as autograd has finished it, then
   * `onGrad(param)` is called (on the thread that finished it).
   */
  virtual StepResult step(const float* images, const int32_t* labels, int64_t n, float* grads,
                          const std::function<void(int)>& onGrad) = 0;
  virtual StepResult evaluate(const float* images, const int32_t* labels, int64_t n) = 0;
  virtual void predict(const float* images, int64_t n, int32_t* classes) = 0;
  /** SGD as torch.optim.SGD (options.sgd): `first` starts the momentum buffer at the gradient. */
  virtual void apply(const float* grads, double lr, bool first) = 0;
  /**
   * step() then apply() with the gradient kept where autograd left it, for one process alone (no
   * all-reduce needs the gradient): no copy to the host and back. A non-finite loss skips the update.
   */
  virtual StepResult trainStep(const float* images, const int32_t* labels, int64_t n, double lr, bool first) = 0;

  enum class State { Weights, Momentum, BatchNormStats };
  /** Reads or writes a whole state vector, TensorFlow layouts (the checkpoint's). */
  virtual void read(State what, float* out) = 0;
  virtual void write(State what, const float* in) = 0;

  /** E.g. "cpu (8 threads, fp32, NCHW)" or "cuda:0 NVIDIA H100 (bf16, channels-last)". */
  virtual std::string describe() const = 0;
};

/** libtorch's version and C++ ABI, as the library in this process reports them. */
std::string libtorchVersion();
int cudaDeviceCount();

}  // namespace dtrain
