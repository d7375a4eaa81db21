/* MPI_Allreduce (float32, MPI_SUM, in place) timed the way tools/bench/allreduce.ts times ours:
 * `warmup` untimed calls, then `iters` timed calls; each call's time is the slowest rank's.
 * Usage: allreduce_mpi FLOATS ITERS WARMUP. Prints one JSON line on rank 0. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  long n = argc > 1 ? atol(argv[1]) : 11200000;
  int iters = argc > 2 ? atoi(argv[2]) : 10, warmup = argc > 3 ? atoi(argv[3]) : 2;
  float *buf = malloc(sizeof(float) * (n > 0 ? n : 1));
  double *times = malloc(sizeof(double) * iters);
  srand(rank + 1);
  for (long i = 0; i < n; i++) buf[i] = (float)rand() / RAND_MAX + 0.5f;
  for (int it = 0; it < warmup + iters; it++) {
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    double dt = MPI_Wtime() - t0, worst;
    MPI_Reduce(&dt, &worst, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    if (it >= warmup) times[it - warmup] = worst;
  }
  if (rank == 0) {
    printf("{\"ranks\":%d,\"floats\":%ld,\"ms\":[", size, n);
    for (int i = 0; i < iters; i++) printf("%s%.4f", i ? "," : "", times[i] * 1e3);
    printf("]}\n");
  }
  free(buf);
  free(times);
  MPI_Finalize();
  return 0;
}
