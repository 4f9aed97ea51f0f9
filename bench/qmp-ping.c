/* qmp-ping: time N QMP round trips over one connection.
 *
 *   qmp-ping SOCKET [N] [COMMAND]     (default 10000 query-version)
 *
 * Negotiates capabilities, then sends one command at a time and waits for its reply line
 * before the next, so the figure is the server's per-command latency plus two socket hops.
 * Replies are only scanned, not parsed: a JSON parser (common/qmp-client.c's) would add ~6 us
 * of client work to every round trip and blur the server's figure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/sockets.h"

static char rbuf[1 << 16];
static size_t rlen;

static double
now(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Read until a complete line holding "return" (or an error) arrived; events are skipped. */
static int
await_return(int fd)
{
  for (;;) {
    char *nl;
    while ((nl = memchr(rbuf, '\n', rlen))) {
      size_t line = nl - rbuf + 1;
      int ok = memmem(rbuf, line, "\"return\"", 8) != NULL;
      int bad = memmem(rbuf, line, "\"error\"", 7) != NULL;
      memmove(rbuf, rbuf + line, rlen - line);
      rlen -= line;
      if (ok)
        return 0;
      if (bad) {
        fprintf(stderr, "qmp-ping: the server returned an error\n");
        return -1;
      }
    }
    if (rlen == sizeof rbuf) {
      fprintf(stderr, "qmp-ping: line too long\n");
      return -1;
    }
    ssize_t n = read(fd, rbuf + rlen, sizeof rbuf - rlen);
    if (n <= 0) {
      fprintf(stderr, "qmp-ping: connection closed\n");
      return -1;
    }
    rlen += n;
  }
}

static int
send_all(int fd, const char *s, size_t len)
{
  while (len) {
    ssize_t n = write(fd, s, len);
    if (n <= 0) {
      perror("qmp-ping: write");
      return -1;
    }
    s += n;
    len -= n;
  }
  return 0;
}

int
main(int argc, char **argv)
{
  g_autoptr(GError) error = NULL;
  int n = argc > 2 ? atoi(argv[2]) : 10000;
  const char *cmd = argc > 3 ? argv[3] : "query-version";
  char req[256];

  if (argc < 2 || n <= 0 || strlen(cmd) > 200) {
    fprintf(stderr, "usage: qmp-ping SOCKET [N] [COMMAND]\n");
    return 2;
  }
  int fd = cbt_socket_connect_unix(argv[1], &error);
  if (fd < 0) {
    fprintf(stderr, "qmp-ping: %s\n", error->message);
    return 1;
  }
  /* The greeting has no "return"; read its line by hand. */
  while (!memchr(rbuf, '\n', rlen)) {
    ssize_t r = read(fd, rbuf + rlen, sizeof rbuf - rlen);
    if (r <= 0)
      return 1;
    rlen += r;
  }
  char *nl = memchr(rbuf, '\n', rlen);
  rlen -= nl - rbuf + 1;
  memmove(rbuf, nl + 1, rlen);
  const char *caps = "{\"execute\": \"qmp_capabilities\"}\n";
  if (send_all(fd, caps, strlen(caps)) < 0 || await_return(fd) < 0)
    return 1;

  int len = snprintf(req, sizeof req, "{\"execute\": \"%s\"}\n", cmd);
  double start = now();
  for (int i = 0; i < n; i++)
    if (send_all(fd, req, len) < 0 || await_return(fd) < 0)
      return 1;
  double secs = now() - start;
  printf("round_trips=%d seconds=%.6f per_rt_us=%.1f\n", n, secs, secs * 1e6 / n);
  close(fd);
  return 0;
}
