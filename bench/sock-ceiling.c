/* sock-ceiling: the fastest a unix stream socket moves bytes between two processes here.
 *
 *   sock-ceiling [GiB]     (default 4)
 *
 * A forked writer sends GiB in 1 MiB write()s, the reader read()s them into a 1 MiB buffer;
 * prints GiB/s. Two copies, like an NBD read served from a user-space buffer minus the
 * server's own read of the page cache: the ceiling for any server on this machine.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BUF (1024 * 1024)

static double
now(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
writer(int fd, long long total)
{
  char *buf = malloc(BUF);
  memset(buf, 0x5a, BUF);
  for (long long sent = 0; sent < total;) {
    ssize_t n = write(fd, buf, BUF);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      perror("sock-ceiling: write");
      _exit(1);
    }
    sent += n;
  }
  _exit(0);
}

int
main(int argc, char **argv)
{
  long long total = (argc > 1 ? atoll(argv[1]) : 4) << 30;
  int sv[2], status;
  char *buf = malloc(BUF);

  if (total <= 0 || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) {
    perror("sock-ceiling");
    return 1;
  }
  double start = now();
  pid_t pid = fork();
  if (pid < 0) {
    perror("sock-ceiling: fork");
    return 1;
  }
  if (pid == 0) {
    close(sv[0]);
    writer(sv[1], total);
  }
  close(sv[1]);
  long long got = 0;
  for (;;) {
    ssize_t n = read(sv[0], buf, BUF);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    got += n;
  }
  double secs = now() - start;
  if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) || got != total) {
    fprintf(stderr, "sock-ceiling: short transfer(%lld of %lld bytes)\n", got, total);
    return 1;
  }
  printf("bytes=%lld seconds=%.6f gibps=%.3f\n", got, secs, got / secs / (1 << 30));
  return 0;
}
