// The tutorial's ResNet on libtorch (ATen ops, autograd), built from the network description
// (engine.h's NetSpec, made from Architecture by the TypeScript side).
#include "engine.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <cmath>
#include <cstring>
#include <sstream>

namespace dtrain {
namespace {

/** The layer and operation running now, for error messages ("stage2.block1.conv1: conv2d"). */
thread_local const std::string* currentLayer = nullptr;
thread_local const char* currentOp = nullptr;

struct Where {
  Where(const std::string& layer, const char* op) {
    currentLayer = &layer;
    currentOp = op;
  }
};

std::string firstLine(const std::string& s) {
  const auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

class TorchEngine final : public Engine {
 public:
  TorchEngine(const NetSpec& spec, const EngineOptions& o) : spec_(spec), options_(o), device_(parseDevice(o.device)) {
    if (o.threads > 0) at::set_num_threads(o.threads);
    if (device_.is_cuda()) {
      // fp32: exact float32 convolutions; tf32: PyTorch's default for cuDNN convolutions.
      at::globalContext().setAllowTF32CuDNN(o.precision == "tf32");
      at::globalContext().setAllowTF32CuBLAS(false);
      at::globalContext().setBenchmarkCuDNN(true);  // fixed shapes: pick the fastest algorithm once
    }
    const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device_);
    params_ = at::zeros({spec.paramCount}, f32);
    momentum_ = at::zeros({spec.paramCount}, f32);
    stats_ = at::zeros({spec.bnStatCount}, f32);
    leaves_.reserve(spec.params.size());
    for (size_t i = 0; i < spec.params.size(); i++) {
      // Leaves sharing params_' storage: the optimiser updates the one flat buffer.
      leaves_.push_back(engineView(params_, i).detach().requires_grad_(true));
      leaves_.back().register_hook([this, i](const at::Tensor& g) { onGrad(static_cast<int>(i), g); });
    }
    initWeights();
    for (const auto* bn : batchNorms()) runningVar(*bn).fill_(1);
    initDecayMask();
  }

  /** Which tensors weight decay applies to (all, or those of more than one dimension), per tensor and as a flat mask. */
  void initDecayMask() {
    bool all = true;
    for (const auto& p : spec_.params) {
      decays_.push_back(!options_.sgd.skipNormBiasDecay || p.shape.size() > 1);
      all = all && decays_.back();
    }
    if (all) return;
    decayMask_ = at::ones({spec_.paramCount}, at::TensorOptions().dtype(at::kFloat).device(device_));
    for (size_t i = 0; i < decays_.size(); i++) if (!decays_[i]) decayMask_.narrow(0, spec_.params[i].offset, spec_.params[i].size).zero_();
  }

  StepResult step(const float* images, const int32_t* labels, int64_t n, float* grads, const std::function<void(int)>& onGrad) override {
    grads_ = at::from_blob(grads, {spec_.paramCount}, at::kFloat);
    onGrad_ = &onGrad;
    try {
      const auto r = forwardBackward(images, labels, n);
      onGrad_ = nullptr;
      for (auto& p : leaves_) p.mutable_grad().reset();
      return r;
    } catch (...) {
      onGrad_ = nullptr;
      throw;
    }
  }

  StepResult trainStep(const float* images, const int32_t* labels, int64_t n, double lr, bool first) override {
    const auto r = forwardBackward(images, labels, n);
    if (std::isfinite(r.loss)) {
      // torch.optim.SGD's per-parameter loop, on the gradients autograd left in each .grad.
      c10::NoGradGuard ng;
      for (size_t i = 0; i < leaves_.size(); i++) {
        auto& p = leaves_[i];
        update(p, p.grad(), engineView(momentum_, i), decays_[i] ? options_.sgd.weightDecay : 0.0, lr, first);
      }
    }
    for (auto& p : leaves_) p.mutable_grad().reset();
    return r;
  }

  StepResult evaluate(const float* images, const int32_t* labels, int64_t n) override {
    try {
      c10::NoGradGuard ng;
      const auto x = input(images, n);
      const auto y = targets(labels, n);
      Autocast ac(options_.precision == "bf16", device_);
      const auto logits = forward(x, false).to(at::kFloat);
      return result(at::cross_entropy_loss(logits, y), logits, y);
    } catch (const c10::Error& e) {
      throw EngineError(located(e));
    }
  }

  void predict(const float* images, int64_t n, int32_t* classes) override {
    try {
      c10::NoGradGuard ng;
      Autocast ac(options_.precision == "bf16", device_);
      const auto c = forward(input(images, n), false).argmax(1).to(at::kInt).cpu();
      std::memcpy(classes, c.data_ptr<int32_t>(), n * sizeof(int32_t));
    } catch (const c10::Error& e) {
      throw EngineError(located(e));
    }
  }

  void apply(const float* grads, double lr, bool first) override {
    c10::NoGradGuard ng;
    auto g = at::from_blob(const_cast<float*>(grads), {spec_.paramCount}, at::kFloat).to(device_);
    const double wd = options_.sgd.weightDecay;
    // One update of the flat buffer; with decay skipped for some tensors, a 0/1 mask says which
    // (p x mask is exact, so g + wd x that rounds as trainStep's per-tensor g + wd x p).
    if (wd > 0 && decayMask_.defined()) {
      g = g.add(params_.mul(decayMask_), wd);
      update(params_, g, momentum_, 0.0, lr, first);
    } else {
      update(params_, g, momentum_, wd, lr, first);
    }
  }

  /** torch.optim.SGD on one tensor (dampening 0): weight decay, momentum, Nesterov. */
  void update(at::Tensor p, at::Tensor g, at::Tensor buf, double weightDecay, double lr, bool first) {
    const auto& o = options_.sgd;
    if (weightDecay > 0) g = g.add(p, weightDecay);
    if (o.momentum > 0) {
      if (first) buf.copy_(g);
      else buf.mul_(o.momentum).add_(g);
      g = o.nesterov ? g.add(buf, o.momentum) : buf;
    }
    p.add_(g, -lr);
  }

  void read(State what, float* out) override {
    c10::NoGradGuard ng;
    if (what == State::BatchNormStats) {
      at::from_blob(out, {spec_.bnStatCount}, at::kFloat).copy_(stats_);
      return;
    }
    const auto& flat = what == State::Weights ? params_ : momentum_;
    const auto host = at::from_blob(out, {spec_.paramCount}, at::kFloat);
    for (size_t i = 0; i < spec_.params.size(); i++) tfView(host, i).copy_(tfLayout(engineView(flat, i), i));
  }

  void write(State what, const float* in) override {
    c10::NoGradGuard ng;
    if (what == State::BatchNormStats) {
      stats_.copy_(at::from_blob(const_cast<float*>(in), {spec_.bnStatCount}, at::kFloat));
      return;
    }
    auto& flat = what == State::Weights ? params_ : momentum_;
    const auto host = at::from_blob(const_cast<float*>(in), {spec_.paramCount}, at::kFloat);
    for (size_t i = 0; i < spec_.params.size(); i++) tfLayout(engineView(flat, i), i).copy_(tfView(host, i));
  }

  std::string describe() const override {
    std::ostringstream s;
    s << device_.str();
    if (device_.is_cpu()) s << " (" << at::get_num_threads() << " threads";
    else s << " (";
    s << (device_.is_cpu() ? ", " : "") << options_.precision << (options_.channelsLast ? ", channels-last)" : ", NCHW)");
    return s.str();
  }

 private:
  /** bf16 autocast around the forward pass: bf16 compute, float32 weights, BatchNorm and loss. */
  struct Autocast {
    Autocast(bool on, const at::Device& d) : on_(on), type_(d.type()) {
      if (!on_) return;
      at::autocast::set_autocast_dtype(type_, at::kBFloat16);
      at::autocast::set_autocast_enabled(type_, true);
    }
    ~Autocast() {
      if (!on_) return;
      at::autocast::set_autocast_enabled(type_, false);
      at::autocast::clear_cache();
    }
    bool on_;
    at::DeviceType type_;
  };

  static at::Device parseDevice(const std::string& d) {
    at::Device device(d);  // throws on a malformed name
    if (device.is_cuda()) {
      const int count = cudaDeviceCount();
      if (count == 0) throw EngineError("device " + d + ": this libtorch has no CUDA or no GPU is visible (CUDA_VISIBLE_DEVICES)");
      if (device.has_index() && device.index() >= count) {
        throw EngineError("device " + d + ": only " + std::to_string(count) + " GPU(s) are visible");
      }
    } else if (!device.is_cpu()) {
      throw EngineError("device " + d + ": only cpu and cuda are supported");
    }
    return device;
  }

  bool isConvWeight(size_t i) const { return spec_.params[i].shape.size() == 4; }

  /** Parameter i of a flat vector in the engine's layout (PyTorch's, optionally channels-last). */
  at::Tensor engineView(const at::Tensor& flat, size_t i) const {
    const auto& p = spec_.params[i];
    const auto part = flat.narrow(0, p.offset, p.size);
    if (!isConvWeight(i)) return part.view(p.shape);  // dense [in, out] is used as it is; 1-d as is
    const int64_t kh = p.shape[0], kw = p.shape[1], in = p.shape[2], out = p.shape[3];
    if (options_.channelsLast) return part.view({out, kh, kw, in}).permute({0, 3, 1, 2});
    return part.view({out, in, kh, kw});
  }

  /** An engine-layout tensor seen in TensorFlow's layout. */
  at::Tensor tfLayout(const at::Tensor& t, size_t i) const { return isConvWeight(i) ? t.permute({2, 3, 1, 0}) : t; }

  /** Parameter i of a host vector in TensorFlow's layout. */
  at::Tensor tfView(const at::Tensor& host, size_t i) const {
    const auto& p = spec_.params[i];
    return host.narrow(0, p.offset, p.size).view(p.shape);
  }

  /** Xavier-uniform (PyTorch's fans), zeros or ones; seeded per parameter: same seed, same weights. */
  void initWeights() {
    c10::NoGradGuard ng;
    for (size_t i = 0; i < spec_.params.size(); i++) {
      const auto& p = spec_.params[i];
      auto t = tfLayout(engineView(params_, i), i);
      if (p.init == "ones") t.fill_(1);
      else if (p.init == "zeros") t.fill_(0);
      else {
        auto gen = at::make_generator<at::CPUGeneratorImpl>(options_.seed * 1000 + i);
        const double limit = std::sqrt(6.0 / (p.fanIn + p.fanOut));
        t.copy_(at::empty(p.shape, at::kFloat).uniform_(-limit, limit, gen));
      }
    }
  }

  std::vector<const BnSpec*> batchNorms() const {
    std::vector<const BnSpec*> v{&spec_.stemBn};
    for (const auto& b : spec_.blocks) v.insert(v.end(), {&b.bn1, &b.bn2});
    return v;
  }
  at::Tensor runningMean(const BnSpec& b) const { return stats_.narrow(0, b.statOffset, b.channels); }
  at::Tensor runningVar(const BnSpec& b) const { return stats_.narrow(0, b.statOffset + b.channels, b.channels); }

  // ---- forward ---------------------------------------------------------------------------

  at::Tensor input(const float* images, int64_t n) const {
    const int64_t s = spec_.imageSize, c = spec_.inChannels;
    // NHWC from the data pipeline is exactly PyTorch's channels-last NCHW: a view, then one copy
    // (the caller's buffer is reused for the next batch).
    auto x = at::from_blob(const_cast<float*>(images), {n, s, s, c}, at::kFloat).permute({0, 3, 1, 2});
    x = x.to(device_, /*non_blocking=*/false, /*copy=*/true);
    return options_.channelsLast ? x.contiguous(at::MemoryFormat::ChannelsLast) : x.contiguous();
  }

  at::Tensor targets(const int32_t* labels, int64_t n) const {
    return at::from_blob(const_cast<int32_t*>(labels), {n}, at::kInt).to(device_, at::kLong);
  }

  at::Tensor conv(const ConvSpec& c, const at::Tensor& x) const {
    Where w(c.name, "conv2d");
    const auto bias = c.bias >= 0 ? leaves_[c.bias] : at::Tensor();
    return at::conv2d(x, leaves_[c.weight], bias, {c.stride, c.stride}, {c.padding, c.padding});
  }

  at::Tensor batchNorm(const BnSpec& b, const at::Tensor& x, bool training) const {
    Where w(b.name, "batch_norm");
    // Training mode updates the running statistics in place, as PyTorch's BatchNorm2d does
    // (momentum 0.1, unbiased variance).
    return at::batch_norm(x, leaves_[b.gamma], leaves_[b.beta], runningMean(b), runningVar(b), training, spec_.bnMomentum, b.eps, true);
  }

  at::Tensor forward(const at::Tensor& images, bool training) const {
    auto x = at::relu(batchNorm(spec_.stemBn, conv(spec_.stemConv, images), training));
    {
      static const std::string pool = "stem.pool";
      Where w(pool, "max_pool2d");
      x = at::max_pool2d(x, {3, 3}, {2, 2}, {1, 1});
    }
    for (const auto& b : spec_.blocks) {
      auto y = at::relu(batchNorm(b.bn1, conv(b.conv1, x), training));
      y = at::relu(batchNorm(b.bn2, conv(b.conv2, y), training));
      x = at::relu(y + (b.hasShortcut ? conv(b.shortcut, x) : x));
    }
    static const std::string head = "head.fc";
    Where w(head, "linear");
    return at::addmm(leaves_[spec_.fcBias], x.mean({2, 3}), leaves_[spec_.fcWeight]);
  }

  /** Forward and backward of the mean cross-entropy; the gradients go where onGrad_ says (or stay in .grad). */
  StepResult forwardBackward(const float* images, const int32_t* labels, int64_t n) {
    try {
      const auto x = input(images, n);
      const auto y = targets(labels, n);
      for (auto& p : leaves_) p.mutable_grad().reset();
      at::Tensor logits;
      {
        Autocast ac(options_.precision == "bf16", device_);
        logits = forward(x, true);
      }
      static const std::string head = "loss";
      Where w(head, "cross_entropy");
      const auto loss = at::cross_entropy_loss(logits.to(at::kFloat), y, {}, at::Reduction::Mean, -100, options_.labelSmoothing);
      static const std::string backward = "backward pass";
      Where b(backward, "autograd");
      loss.backward();
      return result(loss, logits, y);
    } catch (const c10::OutOfMemoryError& e) {
      throw EngineError(outOfMemory(n, e));
    } catch (const c10::Error& e) {
      throw EngineError(located(e));
    }
  }

  // ---- gradients -------------------------------------------------------------------------

  void onGrad(int i, const at::Tensor& g) {
    if (onGrad_ == nullptr) return;  // a backward pass outside step()
    engineView(grads_, i).copy_(g);  // one copy; from a GPU, into the host buffer the ring reads
    (*onGrad_)(i);
  }

  StepResult result(const at::Tensor& loss, const at::Tensor& logits, const at::Tensor& y) const {
    StepResult r;
    r.loss = loss.item<double>();
    r.correct = logits.argmax(1).eq(y).sum().item<int64_t>();
    return r;
  }

  std::string located(const c10::Error& e) const {
    std::string where = currentLayer != nullptr ? *currentLayer + ": " + currentOp : "engine";
    return "torch engine, " + where + ": " + firstLine(e.what_without_backtrace());
  }

  /** CUDA out of memory: the largest batch (halving) that fits now, named with the flag to set. */
  std::string outOfMemory(int64_t n, const c10::OutOfMemoryError& e) {
    const std::string what = firstLine(e.what_without_backtrace());
    int64_t fits = 0;
    for (int64_t b = n / 2; b >= 1 && fits == 0; b /= 2) {
      try {
        std::vector<float> img(b * spec_.imageSize * spec_.imageSize * spec_.inChannels, 0.f);
        std::vector<int32_t> lab(b, 0);
        auto x = input(img.data(), b);
        auto loss = at::cross_entropy_loss(forward(x, true).to(at::kFloat), targets(lab.data(), b));
        loss.backward();
        fits = b;
      } catch (const c10::OutOfMemoryError&) {
      }
      for (auto& p : leaves_) p.mutable_grad().reset();
    }
    std::string advice = fits > 0 ? "a per-worker batch of " + std::to_string(fits) + " fits: use --batch-size " + std::to_string(fits)
                                  : "not even a batch of 1 fits: free the GPU (other processes?) or use fewer workers per GPU";
    return "torch engine: " + device_.str() + " ran out of memory at a batch of " + std::to_string(n) + "; " + advice + " (" + what + ")";
  }

  NetSpec spec_;
  EngineOptions options_;
  at::Device device_;
  at::Tensor params_, momentum_, stats_;
  std::vector<bool> decays_;  // per parameter: does weight decay apply
  at::Tensor decayMask_;      // flat 0/1 of decays_, defined only when some tensor is skipped
  std::vector<at::Tensor> leaves_;
  at::Tensor grads_;
  const std::function<void(int)>* onGrad_ = nullptr;
};

}  // namespace

std::unique_ptr<Engine> Engine::create(const NetSpec& spec, const EngineOptions& options) {
  try {
    return std::make_unique<TorchEngine>(spec, options);
  } catch (const c10::Error& e) {
    throw EngineError("torch engine: cannot start on " + options.device + ": " + firstLine(e.what_without_backtrace()));
  }
}

std::string libtorchVersion() {
  return std::string(TORCH_VERSION) + (_GLIBCXX_USE_CXX11_ABI ? " (C++11 ABI)" : " (pre-C++11 ABI)");
}

int cudaDeviceCount() {
  const auto& hooks = at::detail::getCUDAHooks();
  return hooks.hasCUDA() ? hooks.deviceCount() : 0;
}

}  // namespace dtrain
