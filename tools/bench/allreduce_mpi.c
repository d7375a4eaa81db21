/* MPI_Allreduce (float32, MPI_SUM, in place) timed the way tools/bench/allreduce.ts times ours:
 * `warmup` untimed calls, then `iters` timed calls; each call's time is the slowest rank's.
 * Usage: allreduce_mpi FLOATS ITERS WARMUP. Prints one JSON line on rank 0: the times and the CPU
 * time per timed call summed over the ranks (cpuMsPerOp). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>

/* CPU time (user + system, all threads) of this process so far, in ms. */
static double cpu_ms(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e3 + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e3;
}

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
  double cpu0 = 0;
  for (int it = 0; it < warmup + iters; it++) {
    if (it == warmup) cpu0 = cpu_ms();
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    double dt = MPI_Wtime() - t0, worst;
    MPI_Reduce(&dt, &worst, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    if (it >= warmup) times[it - warmup] = worst;
  }
  /* CPU time per timed call, summed over the ranks (busy-polling included, as it costs a core). */
  double cpu = (cpu_ms() - cpu0) / iters, cpu_all = 0;
  MPI_Reduce(&cpu, &cpu_all, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
  if (rank == 0) {
    printf("{\"ranks\":%d,\"floats\":%ld,\"cpuMsPerOp\":%.3f,\"ms\":[", size, n, cpu_all);
    for (int i = 0; i < iters; i++) printf("%s%.4f", i ? "," : "", times[i] * 1e3);
    printf("]}\n");
  }
  free(buf);
  free(times);
  MPI_Finalize();
  return 0;
}
