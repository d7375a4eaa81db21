{
  "targets": [
    {
      "target_name": "dtrain_loader",
      "sources": ["loader.c"],
      "libraries": ["-ldl"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
