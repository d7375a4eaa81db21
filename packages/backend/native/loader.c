// What loading the native libraries needs beyond what Node offers:
//
// 1. Holding back what the native TensorFlow library writes to file descriptor 2 while it loads.
//
// libtensorflow logs through Abseil, whose messages before absl::InitializeLog() ignore both
// TF_CPP_MIN_LOG_LEVEL and Abseil's own threshold, and it logs from static initialisers: no
// setting made from JavaScript can reach them. So the loader points fd 2 at an anonymous file for
// the length of the load, then puts it back and hands the text to JavaScript, which writes back
// every line that TF_CPP_MIN_LOG_LEVEL keeps (errors always).
//
//   hold()    -> undefined   fd 2 now writes to an unlinked temporary file (throws if it cannot)
//   release() -> string      fd 2 restored; what was written meanwhile
//
// 2. Loading a shared library by path, for good: Dawn dlopen()s "libvulkan.so.1" by name, and the
//    Vulkan loader of the software GPU (tools/software-gpu) lives in a project folder, not on the
//    library path; LD_LIBRARY_PATH is read when a process starts, too late for one that finds out
//    at run time. Once loaded (RTLD_GLOBAL), a dlopen by that soname finds this copy.
//   preload(path) -> undefined   dlopen(path, RTLD_NOW | RTLD_GLOBAL), never closed (throws dlerror())
#include <dlfcn.h>
#include <node_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int saved_fd = -1; // the real fd 2 while held
static FILE *held = NULL; // where fd 2 writes meanwhile

static napi_value fail(napi_env env, const char *what) {
  napi_throw_error(env, NULL, what);
  return NULL;
}

static napi_value hold(napi_env env, napi_callback_info info) {
  (void)info;
  if (held != NULL) return fail(env, "stderr is already held");
  fflush(stderr);
  held = tmpfile();
  if (held == NULL) return fail(env, "tmpfile() failed");
  saved_fd = dup(2);
  if (saved_fd < 0 || dup2(fileno(held), 2) < 0) {
    if (saved_fd >= 0) close(saved_fd);
    fclose(held);
    held = NULL;
    return fail(env, "dup/dup2 of fd 2 failed");
  }
  return NULL;
}

static napi_value release(napi_env env, napi_callback_info info) {
  (void)info;
  if (held == NULL) return fail(env, "stderr is not held");
  fflush(stderr);
  dup2(saved_fd, 2);
  close(saved_fd);
  saved_fd = -1;
  long size = ftell(held);
  char *text = size > 0 ? malloc((size_t)size) : NULL;
  size_t got = 0;
  if (text != NULL) {
    rewind(held);
    got = fread(text, 1, (size_t)size, held);
  }
  fclose(held);
  held = NULL;
  napi_value out;
  napi_create_string_utf8(env, text != NULL ? text : "", got, &out);
  free(text);
  return out;
}

static napi_value preload(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  char path[4096];
  size_t len = 0;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_get_value_string_utf8(env, argv[0], path, sizeof path, &len) != napi_ok || len == 0 || len >= sizeof path - 1) {
    return fail(env, "preload(path): a path is needed");
  }
  if (dlopen(path, RTLD_NOW | RTLD_GLOBAL) == NULL) {
    const char *why = dlerror();
    return fail(env, why != NULL ? why : "dlopen failed");
  }
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"hold", NULL, hold, NULL, NULL, NULL, napi_default, NULL},
      {"release", NULL, release, NULL, NULL, NULL, napi_default, NULL},
      {"preload", NULL, preload, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, 3, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
