{
  "targets": [
    {
      "target_name": "dtrain_shm",
      "sources": ["shm.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
