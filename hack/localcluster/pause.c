/* The pod sandbox ("pause") process of the local real node: holds the pod's namespaces until told to stop.
 * It blocks in pause(), reaps any child (it is PID 1 of the pod when the PID namespace is shared) and exits 0 on
 * SIGTERM or SIGINT. Built with `gcc -static` by hack/localcluster/images.py; registry.k8s.io is out of reach. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signo) { (void)signo; _exit(0); }

static void reap(int signo) {
  (void)signo;
  while (waitpid(-1, 0, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction on_stop = {.sa_handler = stop}, on_child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  if (sigaction(SIGINT, &on_stop, 0) < 0 || sigaction(SIGTERM, &on_stop, 0) < 0 ||
      sigaction(SIGCHLD, &on_child, 0) < 0) {
    return 1;
  }
  for (;;) {
    pause();
  }
}
