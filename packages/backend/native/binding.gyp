{
  "targets": [
    {
      "target_name": "dtrain_stderr",
      "sources": ["stderr.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
