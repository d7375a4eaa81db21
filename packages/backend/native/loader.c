// Holds back what the native TensorFlow library writes to file descriptor 2 while it loads.
//
// libtensorflow logs through Abseil, whose messages before absl::InitializeLog() ignore both
// TF_CPP_MIN_LOG_LEVEL and Abseil's own threshold, and it logs from static initialisers: no
// setting made from JavaScript can reach them. So the loader points fd 2 at an anonymous file for
// the length of the load, then puts it back and hands the text to JavaScript, which writes back
// every line that TF_CPP_MIN_LOG_LEVEL keeps (errors always).
//
//   hold()    -> undefined   fd 2 now writes to an unlinked temporary file (throws if it cannot)
//   release() -> string      fd 2 restored; what was written meanwhile
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

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"hold", NULL, hold, NULL, NULL, NULL, napi_default, NULL},
      {"release", NULL, release, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, 2, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
