// N-API binding of the engine (node-addon-api). Every libtorch call runs on one engine thread
// per model: libtorch's intra-op pool (OpenMP) belongs to the thread that starts it, and the JS
// thread stays free for the coordinator's messages while a step runs. Asynchronous calls (step,
// evaluate, predict) return Promises; gradient buckets are reported to JS through a
// thread-safe function as soon as their last parameter's gradient is in the caller's buffer.
#define NAPI_VERSION 8
#define NAPI_DISABLE_CPP_EXCEPTIONS
#include <napi.h>

#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <thread>

#include "engine.h"

namespace {

using dtrain::Engine;

/** Runs jobs in order on one thread. */
class EngineThread {
 public:
  EngineThread() : thread_([this] { loop(); }) {}
  ~EngineThread() {
    {
      std::lock_guard<std::mutex> l(m_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  void post(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> l(m_);
      jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
  }
  /** Runs `job` there and waits; returns the message of what it threw ("" if nothing). */
  std::string run(const std::function<void()>& job) {
    std::promise<std::string> done;
    post([&] {
      try {
        job();
        done.set_value("");
      } catch (const std::exception& e) {
        done.set_value(e.what()[0] != 0 ? e.what() : "torch engine: unknown error");
      }
    });
    return done.get_future().get();
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> l(m_);
        cv_.wait(l, [this] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool stop_ = false;
  std::thread thread_;
};

// ---- reading the network description ------------------------------------------------------

int64_t num(const Napi::Object& o, const char* k) { return o.Get(k).As<Napi::Number>().Int64Value(); }
double dbl(const Napi::Object& o, const char* k) { return o.Get(k).As<Napi::Number>().DoubleValue(); }
std::string str(const Napi::Object& o, const char* k) { return o.Get(k).As<Napi::String>().Utf8Value(); }
Napi::Object obj(const Napi::Object& o, const char* k) { return o.Get(k).As<Napi::Object>(); }

dtrain::ConvSpec convSpec(const Napi::Object& o) {
  return {str(o, "name"), int(num(o, "kernel")), int(num(o, "stride")), int(num(o, "padding")), int(num(o, "weight")), int(num(o, "bias"))};
}
dtrain::BnSpec bnSpec(const Napi::Object& o) {
  return {str(o, "name"), num(o, "channels"), dbl(o, "eps"), int(num(o, "gamma")), int(num(o, "beta")), num(o, "statOffset")};
}

/** The shape the TypeScript side (src/spec.ts) builds; its types are checked there. */
dtrain::NetSpec netSpec(const Napi::Object& o) {
  dtrain::NetSpec s;
  s.inChannels = num(o, "inChannels");
  s.classes = num(o, "classes");
  s.imageSize = num(o, "imageSize");
  s.stemConv = convSpec(obj(o, "stemConv"));
  s.stemBn = bnSpec(obj(o, "stemBn"));
  const auto blocks = o.Get("blocks").As<Napi::Array>();
  for (uint32_t i = 0; i < blocks.Length(); i++) {
    const auto b = blocks.Get(i).As<Napi::Object>();
    dtrain::BlockSpec block{str(b, "name"), convSpec(obj(b, "conv1")), convSpec(obj(b, "conv2")), {}, bnSpec(obj(b, "bn1")), bnSpec(obj(b, "bn2")), false};
    if (b.Has("shortcut") && b.Get("shortcut").IsObject()) {
      block.shortcut = convSpec(obj(b, "shortcut"));
      block.hasShortcut = true;
    }
    s.blocks.push_back(block);
  }
  s.fcWeight = int(num(o, "fcWeight"));
  s.fcBias = int(num(o, "fcBias"));
  s.bnMomentum = dbl(o, "bnMomentum");
  const auto params = o.Get("params").As<Napi::Array>();
  for (uint32_t i = 0; i < params.Length(); i++) {
    const auto p = params.Get(i).As<Napi::Object>();
    dtrain::ParamSpec ps{str(p, "name"), {}, num(p, "offset"), num(p, "size"), str(p, "init"), dbl(p, "fanIn"), dbl(p, "fanOut")};
    const auto shape = p.Get("shape").As<Napi::Array>();
    for (uint32_t d = 0; d < shape.Length(); d++) ps.shape.push_back(shape.Get(d).As<Napi::Number>().Int64Value());
    s.params.push_back(ps);
  }
  s.paramCount = num(o, "paramCount");
  s.bnStatCount = num(o, "bnStatCount");
  return s;
}

// ---- the JS class -------------------------------------------------------------------------

/** One asynchronous call: its promise, the buffers it uses (kept alive) and its callbacks. */
struct AsyncCall {
  Napi::Promise::Deferred deferred;
  Napi::ThreadSafeFunction tsfn;
  std::vector<Napi::Reference<Napi::Value>> keep;
  std::string error;
  dtrain::StepResult result;
  std::vector<int32_t> classes;
  Napi::Reference<Napi::Value> callbackError;
  explicit AsyncCall(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
};

class EngineWrap : public Napi::ObjectWrap<EngineWrap> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "Engine",
                       {InstanceMethod<&EngineWrap::step>("step"), InstanceMethod<&EngineWrap::evaluate>("evaluate"),
                        InstanceMethod<&EngineWrap::predict>("predict"), InstanceMethod<&EngineWrap::apply>("apply"), InstanceMethod<&EngineWrap::trainStep>("trainStep"),
                        InstanceMethod<&EngineWrap::read>("read"), InstanceMethod<&EngineWrap::write>("write"),
                        InstanceMethod<&EngineWrap::describe>("describe"), InstanceMethod<&EngineWrap::close>("close")});
  }

  EngineWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EngineWrap>(info) {
    const auto spec = netSpec(info[0].As<Napi::Object>());
    const auto o = info[1].As<Napi::Object>();
    dtrain::EngineOptions opts{str(o, "device"), int(num(o, "threads")), str(o, "precision"), o.Get("channelsLast").ToBoolean(), uint64_t(num(o, "seed"))};
    const auto sgd = o.Get("sgd").As<Napi::Object>();
    opts.sgd = {dbl(sgd, "momentum"), dbl(sgd, "weightDecay"), sgd.Get("nesterov").ToBoolean(), sgd.Get("skipNormBiasDecay").ToBoolean()};
    opts.labelSmoothing = dbl(o, "labelSmoothing");
    if (info.Env().IsExceptionPending()) return;
    thread_ = std::make_unique<EngineThread>();
    const auto err = thread_->run([&] { engine_ = Engine::create(spec, opts); });
    if (!err.empty()) {
      thread_.reset();
      Napi::Error::New(info.Env(), err).ThrowAsJavaScriptException();
    }
  }

  ~EngineWrap() override {
    // The engine's tensors must go on the thread that made them; then the thread itself.
    if (thread_) thread_->run([this] { engine_.reset(); });
  }

 private:
  bool usable(Napi::Env env, bool sync) {
    const char* why = !engine_ ? "torch engine: the model was disposed" : (sync && busy_ > 0 ? "torch engine: a step is still running; await it first" : nullptr);
    if (why != nullptr) Napi::Error::New(env, why).ThrowAsJavaScriptException();
    return why == nullptr;
  }

  /** Starts `work` on the engine thread; `settle` runs on the JS thread and resolves the promise. */
  Napi::Value start(const Napi::CallbackInfo& info, Napi::Function callback, std::vector<Napi::Value> keep,
                    std::function<void(AsyncCall&)> work, std::function<Napi::Value(Napi::Env, AsyncCall&)> settle) {
    const auto env = info.Env();
    auto* call = new AsyncCall(env);
    // The buffers the engine thread reads and writes, and this object: none may be collected
    // while the call runs.
    keep.push_back(info.This());
    for (auto& v : keep) call->keep.push_back(Napi::Persistent(v));
    if (callback.IsEmpty()) callback = Napi::Function::New(env, [](const Napi::CallbackInfo&) {});
    call->tsfn = Napi::ThreadSafeFunction::New(env, callback, "dtrain-torch-engine", 0, 1);
    busy_++;
    const auto promise = call->deferred.Promise();
    thread_->post([this, call, work, settle] {
      try {
        work(*call);
      } catch (const std::exception& e) {
        call->error = e.what();
      }
      call->tsfn.BlockingCall([this, call, settle](Napi::Env env, Napi::Function) {
        busy_--;
        if (!call->callbackError.IsEmpty()) call->deferred.Reject(call->callbackError.Value());
        else if (!call->error.empty()) call->deferred.Reject(Napi::Error::New(env, call->error).Value());
        else call->deferred.Resolve(settle(env, *call));
        call->tsfn.Release();
        delete call;
      });
    });
    return promise;
  }

  static Napi::Value stepResult(Napi::Env env, AsyncCall& c) {
    auto r = Napi::Object::New(env);
    r.Set("loss", c.result.loss);
    r.Set("correct", double(c.result.correct));
    return r;
  }

  // step(images, labels, n, grads, bucketOfParam: Int32Array | null, onBucket: ((k) => void) | null)
  Napi::Value step(const Napi::CallbackInfo& info) {
    if (!usable(info.Env(), false)) return info.Env().Undefined();
    const auto images = info[0].As<Napi::Float32Array>();
    const auto labels = info[1].As<Napi::Int32Array>();
    const int64_t n = info[2].As<Napi::Number>().Int64Value();
    auto grads = info[3].As<Napi::Float32Array>();
    std::vector<int32_t> bucketOf;
    Napi::Function onBucket;
    if (info[4].IsTypedArray()) {
      const auto b = info[4].As<Napi::Int32Array>();
      bucketOf.assign(b.Data(), b.Data() + b.ElementLength());
      onBucket = info[5].As<Napi::Function>();
    }
    const float* img = images.Data();
    const int32_t* lab = labels.Data();
    float* out = grads.Data();
    return start(info, onBucket, {images, labels, grads}, [this, img, lab, n, out, bucketOf](AsyncCall& c) {
      // Parameters missing per bucket; a bucket is reported when its count reaches 0.
      std::vector<int> missing;
      for (int32_t k : bucketOf) {
        if (k >= int32_t(missing.size())) missing.resize(k + 1, 0);
        if (k >= 0) missing[k]++;
      }
      const std::function<void(int)> onGrad = [&](int i) {
        if (bucketOf.empty() || bucketOf[i] < 0 || --missing[bucketOf[i]] != 0) return;
        const int k = bucketOf[i];
        c.tsfn.BlockingCall([&c, k](Napi::Env env, Napi::Function fn) {
          fn.Call({Napi::Number::New(env, k)});
          if (env.IsExceptionPending() && c.callbackError.IsEmpty()) c.callbackError = Napi::Persistent(Napi::Value(env.GetAndClearPendingException().Value()));
        });
      };
      c.result = engine_->step(img, lab, n, out, onGrad);
    }, stepResult);
  }

  // trainStep(images, labels, n, lr, first)
  Napi::Value trainStep(const Napi::CallbackInfo& info) {
    if (!usable(info.Env(), false)) return info.Env().Undefined();
    const auto images = info[0].As<Napi::Float32Array>();
    const auto labels = info[1].As<Napi::Int32Array>();
    const int64_t n = info[2].As<Napi::Number>().Int64Value();
    const double lr = info[3].As<Napi::Number>();
    const bool first = info[4].ToBoolean();
    const float* img = images.Data();
    const int32_t* lab = labels.Data();
    return start(info, Napi::Function(), {images, labels}, [this, img, lab, n, lr, first](AsyncCall& c) { c.result = engine_->trainStep(img, lab, n, lr, first); }, stepResult);
  }

  Napi::Value evaluate(const Napi::CallbackInfo& info) {
    if (!usable(info.Env(), false)) return info.Env().Undefined();
    const auto images = info[0].As<Napi::Float32Array>();
    const auto labels = info[1].As<Napi::Int32Array>();
    const int64_t n = info[2].As<Napi::Number>().Int64Value();
    const float* img = images.Data();
    const int32_t* lab = labels.Data();
    return start(info, Napi::Function(), {images, labels}, [this, img, lab, n](AsyncCall& c) { c.result = engine_->evaluate(img, lab, n); }, stepResult);
  }

  Napi::Value predict(const Napi::CallbackInfo& info) {
    if (!usable(info.Env(), false)) return info.Env().Undefined();
    const auto images = info[0].As<Napi::Float32Array>();
    const int64_t n = info[1].As<Napi::Number>().Int64Value();
    const float* img = images.Data();
    return start(info, Napi::Function(), {images}, [this, img, n](AsyncCall& c) {
      c.classes.resize(n);
      engine_->predict(img, n, c.classes.data());
    }, [](Napi::Env env, AsyncCall& c) -> Napi::Value {
      auto out = Napi::Int32Array::New(env, c.classes.size());
      std::copy(c.classes.begin(), c.classes.end(), out.Data());
      return out;
    });
  }

  /** Runs `job` on the engine thread while this thread waits (the engine is idle between steps). */
  Napi::Value sync(const Napi::CallbackInfo& info, const std::function<void()>& job) {
    if (!usable(info.Env(), true)) return info.Env().Undefined();
    const auto err = thread_->run(job);
    if (!err.empty()) Napi::Error::New(info.Env(), err).ThrowAsJavaScriptException();
    return info.Env().Undefined();
  }

  // apply(grads, lr, first)
  Napi::Value apply(const Napi::CallbackInfo& info) {
    const float* g = info[0].As<Napi::Float32Array>().Data();
    const double lr = info[1].As<Napi::Number>();
    const bool first = info[2].ToBoolean();
    return sync(info, [&] { engine_->apply(g, lr, first); });
  }

  static Engine::State state(const Napi::Value& v) {
    const auto s = v.As<Napi::String>().Utf8Value();
    return s == "weights" ? Engine::State::Weights : s == "momentum" ? Engine::State::Momentum : Engine::State::BatchNormStats;
  }

  // read('weights' | 'momentum' | 'bnStats', out) / write(what, in)
  Napi::Value read(const Napi::CallbackInfo& info) {
    float* out = info[1].As<Napi::Float32Array>().Data();
    const auto what = state(info[0]);
    return sync(info, [&] { engine_->read(what, out); });
  }
  Napi::Value write(const Napi::CallbackInfo& info) {
    const float* in = info[1].As<Napi::Float32Array>().Data();
    const auto what = state(info[0]);
    return sync(info, [&] { engine_->write(what, in); });
  }

  Napi::Value describe(const Napi::CallbackInfo& info) {
    if (!usable(info.Env(), false)) return info.Env().Undefined();
    return Napi::String::New(info.Env(), engine_->describe());
  }

  Napi::Value close(const Napi::CallbackInfo& info) {
    if (!engine_) return info.Env().Undefined();
    if (!usable(info.Env(), true)) return info.Env().Undefined();
    thread_->run([this] { engine_.reset(); });
    thread_.reset();
    return info.Env().Undefined();
  }

  std::unique_ptr<EngineThread> thread_;
  std::unique_ptr<Engine> engine_;
  int busy_ = 0;
};

Napi::Object init(Napi::Env env, Napi::Object exports) {
  exports.Set("Engine", EngineWrap::define(env));
  exports.Set("libtorchVersion", Napi::String::New(env, dtrain::libtorchVersion()));
  exports.Set("cudaDeviceCount", Napi::Function::New(env, [](const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), dtrain::cudaDeviceCount()); }));
  return exports;
}

}  // namespace

NODE_API_MODULE(dtrain_torch, init)
