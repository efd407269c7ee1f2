/*
 * The jobs runner: the agent's Python child (python3 -m sfmpi.guest.agent
 * --jobs-fd 3), which runs commands for `vm exec`.  hostd's lines the agent
 * does not handle itself (exec, signal) go to it over a socketpair, and its
 * events go to hostd unchanged.
 */
#ifndef SFMPI_AGENT_JOBS_RUNNER_H
#define SFMPI_AGENT_JOBS_RUNNER_H

/* Forks and execs `python` -m sfmpi.guest.agent with the socketpair as fd 3. */
void start_jobs_runner(const char *python);

/* The agent's end of the socketpair (for the poll loop); -1 before the start. */
int jobs_runner_fd(void);

/* Its events, line by line, to hostd.  A closed socketpair ends the agent. */
void jobs_readable(void);

/* One of hostd's lines, for the jobs runner to answer. */
void forward_to_jobs_runner(const char *line);

#endif
