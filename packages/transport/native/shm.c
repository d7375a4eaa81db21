// Maps a file (on /dev/shm) into memory and hands it to JavaScript as an ArrayBuffer, so that two
// processes on one host share the pages: the ring's same-host links write a piece once, into the
// mapping, and the next rank reads it from there (see ../README.md, "Same-host links").
// Node has no mmap of its own. This is the whole native part: one function, no state.
#include <errno.h>
#include <stdio.h>
#include <node_api.h>
#include <string.h>
#include <sys/mman.h>

#define CHECK(call)                                                   \
  do {                                                                \
    if ((call) != napi_ok) {                                          \
      napi_throw_error(env, NULL, "dtrain_shm: N-API call failed");   \
      return NULL;                                                    \
    }                                                                 \
  } while (0)

// The mapping's size is reported to V8 as external memory, so that a ring's segments are
// collected (and their pages freed) soon after the ring is dropped, as elastic regroups do.
static void unmap(napi_env env, void* data, void* hint) {
  int64_t ignored;
  napi_adjust_external_memory(env, -(int64_t)(uintptr_t)hint, &ignored);
  munmap(data, (size_t)(uintptr_t)hint);
}

// map(fd, length, writable) -> ArrayBuffer over the whole file, MAP_SHARED. The mapping outlives
// the descriptor (the caller closes it) and is unmapped when the ArrayBuffer is collected, so no
// view into it can outlive it.
static napi_value map(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc != 3) {
    napi_throw_type_error(env, NULL, "dtrain_shm.map(fd, length, writable)");
    return NULL;
  }
  int32_t fd;
  int64_t length;
  bool writable;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  CHECK(napi_get_value_int64(env, argv[1], &length));
  CHECK(napi_get_value_bool(env, argv[2], &writable));
  if (length <= 0) {
    napi_throw_range_error(env, NULL, "dtrain_shm.map: length must be > 0");
    return NULL;
  }
  void* p = mmap(NULL, (size_t)length, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    char msg[160];
    snprintf(msg, sizeof msg, "mmap of %lld bytes failed: %s", (long long)length, strerror(errno));
    napi_throw_error(env, NULL, msg);
    return NULL;
  }
  napi_value ab;
  if (napi_create_external_arraybuffer(env, p, (size_t)length, unmap, (void*)(uintptr_t)length, &ab) != napi_ok) {
    munmap(p, (size_t)length);
    napi_throw_error(env, NULL, "dtrain_shm: could not wrap the mapping in an ArrayBuffer");
    return NULL;
  }
  int64_t ignored;
  napi_adjust_external_memory(env, length, &ignored);
  return ab;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  CHECK(napi_create_function(env, "map", NAPI_AUTO_LENGTH, map, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "map", fn));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
