/* sfmpi._native: the memory server, memtap and the page-map scan, for Python.
 * The daemons run in the calling thread with the GIL released, until a
 * signal (SIGTERM, SIGINT, SIGHUP) stops them; Python (sfmpi/native/) gives
 * them their command lines and hostd owns each process through one class. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <stddef.h>

#include "counters.h"
#include "memtap.h"
#include "pagemap.h"
#include "protocol.h"
#include "server.h"

static PyObject *py_scan(PyObject *self, PyObject *args) {
    (void)self;
    const char *ram, *out;
    if (!PyArg_ParseTuple(args, "ss", &ram, &out))
        return NULL;
    struct pagemap map;
    uint64_t nonzero = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pagemap_scan(ram, &map, &nonzero);
    if (rc == 0) {
        rc = pagemap_save(&map, out);
        pagemap_free(&map);
    }
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, ram);
    }
    return Py_BuildValue("K", (unsigned long long)nonzero);
}

static struct ms_server *running_server;

static void stop_server(int sig) {
    (void)sig;
    if (running_server)
        ms_stop(running_server);
}

static PyObject *py_serve(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *names[] = {"listen", "port", "control", "counters", "max_connections", "ready", "multicast_from",
                            "multicast_rate", NULL};
    struct ms_config cfg = {0};
    int port = 0;
    unsigned long long rate = 0;
    PyObject *ready = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sisz|iOzK", names, &cfg.listen_host, &port, &cfg.control_path,
                                     &cfg.counters_path, &cfg.max_connections, &ready, &cfg.mcast_if, &rate))
        return NULL;
    cfg.mcast_rate = rate;
    if (port < 0 || port > 65535)
        return PyErr_Format(PyExc_ValueError, "port %d out of range", port);
    cfg.port = (uint16_t)port;
    const char *err = "";
    struct ms_server *s;
    int rc = ms_create(&cfg, &s, &err);
    if (rc < 0)
        return PyErr_Format(PyExc_OSError, "memory server: %s: %s", err, strerror(-rc));
    if (ready != Py_None) {
        PyObject *r = PyObject_CallFunction(ready, "i", (int)ms_port(s));
        if (!r) {
            ms_destroy(s);
            return NULL;
        }
        Py_DECREF(r);
    }
    running_server = s;
    struct sigaction sa = {.sa_handler = stop_server}, old[3];
    int sigs[3] = {SIGTERM, SIGINT, SIGHUP};
    for (int i = 0; i < 3; i++)
        sigaction(sigs[i], &sa, &old[i]);
    Py_BEGIN_ALLOW_THREADS
    rc = ms_run(s);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < 3; i++)
        sigaction(sigs[i], &old[i], NULL);
    running_server = NULL;
    ms_destroy(s);
    if (rc < 0)
        return PyErr_Format(PyExc_OSError, "memory server: %s", strerror(-rc));
    Py_RETURN_NONE;
}

static void call_ready(void *arg) {
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *r = PyObject_CallNoArgs((PyObject *)arg);
    if (!r)
        PyErr_Print();
    Py_XDECREF(r);
    PyGILState_Release(g);
}

static PyObject *py_memtap(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *names[] = {"mountpoint", "host", "port", "checkpoint", "token", "page_map", "counters",
                            "connections", "timeout_ms", "read_ahead_kb", "ready", "group", "multicast_local",
                            "multicast_wait_ms", "push", "working_set", NULL};
    struct memtap_config cfg = {.read_ahead_kb = -1};
    int port = 0;
    PyObject *ready = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ssissss|iiiOzzipz", names, &cfg.mountpoint, &cfg.server_host, &port,
                                     &cfg.checkpoint, &cfg.token_hex, &cfg.map_path, &cfg.counters_path,
                                     &cfg.connections, &cfg.timeout_ms, &cfg.read_ahead_kb, &ready, &cfg.group,
                                     &cfg.mcast_local, &cfg.mcast_wait_ms, &cfg.push, &cfg.workingset))
        return NULL;
    if (port < 1 || port > 65535)
        return PyErr_Format(PyExc_ValueError, "port %d out of range", port);
    cfg.server_port = (uint16_t)port;
    char err[512] = "";
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = memtap_run(&cfg, err, sizeof err, ready != Py_None ? call_ready : NULL, ready);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return PyErr_Format(PyExc_OSError, "memtap: %s", err);
    Py_RETURN_NONE;
}

static PyObject *py_counter_layout(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    PyObject *fields = PyList_New(MC_FIELDS);
    if (!fields)
        return NULL;
    for (int i = 0; i < MC_FIELDS; i++)
        PyList_SET_ITEM(fields, i, PyUnicode_FromString(mc_field_names[i]));
    return Py_BuildValue("{s:y#,s:n,s:n,s:n,s:n,s:N,s:i}", "magic", MC_MAGIC, (Py_ssize_t)8, "header",
                         (Py_ssize_t)sizeof(struct mc_header), "slot", (Py_ssize_t)sizeof(struct mc_slot),
                         "id_len", (Py_ssize_t)MC_ID_LEN, "fields_offset", (Py_ssize_t)offsetof(struct mc_slot, field),
                         "fields", fields, "hist", MC_HIST);
}

static PyObject *py_status_name(PyObject *self, PyObject *arg) {
    (void)self;
    unsigned long v = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(mp_status_name((uint32_t)v));
}

static PyMethodDef METHODS[] = {
    {"scan", py_scan, METH_VARARGS, "scan(ram_path, map_path) -> pages with data; writes the page map"},
    {"serve", (PyCFunction)(void (*)(void))py_serve, METH_VARARGS | METH_KEYWORDS,
     "serve(listen, port, control, counters, max_connections=256, ready=None, multicast_from=None, "
     "multicast_rate=0): run the memory server"},
    {"memtap", (PyCFunction)(void (*)(void))py_memtap, METH_VARARGS | METH_KEYWORDS,
     "memtap(mountpoint, host, port, checkpoint, token, page_map, counters, connections=4, timeout_ms=10000, "
     "read_ahead_kb=1024, ready=None, group=None, multicast_local=None, multicast_wait_ms=200, push=False, "
     "working_set=None): mount and serve"},
    {"counter_layout", py_counter_layout, METH_NOARGS, "the counters file's layout"},
    {"status_name", py_status_name, METH_O, "what a protocol status means"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "sfmpi._native", "sfmpi's lazy memory path in C", -1,
                                    METHODS, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&MODULE);
    if (!m)
        return NULL;
    PyModule_AddIntConstant(m, "PROTOCOL_VERSION", MP_VERSION);
    PyModule_AddIntConstant(m, "PAGE", MP_PAGE);
    PyModule_AddIntConstant(m, "MAX_REQUEST", MP_MAX_REQUEST);
    PyModule_AddIntConstant(m, "TOKEN_BYTES", MP_TOKEN_LEN);
    return m;
}
