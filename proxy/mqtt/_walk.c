/* The fast paths' walk over a chunk of PUBLISH packets (proxy/mqtt/fastpath.py), compiled.
 *
 * Why in C: a bulk publisher's chunk holds dozens of PUBLISH packets, and the Python loop costs
 * about half a microsecond a packet in bytecode alone (index, shift, compare, slice, tuple, dict
 * lookup): a third of keygate's CPU in the bulk-ingest benchmark. Here the same walk reads the
 * bytes in place and builds the cache key only when a packet's topic, QoS or retain flag differs
 * from the packet before (a bulk publisher repeats one topic).
 *
 * The two functions are line for line the Python ones in fastpath.py (same arguments, same
 * answers, same calls on the rate limiter and the answered set, in the same order); fastpath.py
 * keeps the Python ones as the fallback and tests/unit/test_mqtt_walk.py holds the two to each
 * other on random chunks. Nothing here writes a cache: it only reads the session's maps.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* fastpath._QOS, given once by fastpath.py (init): a first byte's QoS or NOT_FAST. */
static unsigned char qos_of[256];
static int ready = 0;
#define NOT_FAST 3  /* above every max_qos below */
static Py_ssize_t rate_batch = 0;
static PyObject *str_allowed = NULL;
/* The limiter's two methods, by interned name and vectorcall: PyObject_CallMethod made the name's
 * str and built the arguments from a format string on every call, once per chunk (1,500 of the
 * 7,700 instructions a one-message chunk cost in the walk: callgrind, bench/mqtt_shell_instr.py). */
static PyObject *str_take = NULL;
static PyObject *str_give_back = NULL;

/* limiter.<name>(sub, n) */
static PyObject *
call_limiter(PyObject *limiter, PyObject *name, PyObject *sub, Py_ssize_t n)
{
    PyObject *count = PyLong_FromSsize_t(n);
    if (count == NULL)
        return NULL;
    PyObject *args[3] = {limiter, sub, count};
    PyObject *r = PyObject_VectorcallMethod(name, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(count);
    return r;
}

static PyObject *
walk_init(PyObject *self, PyObject *args)
{
    Py_buffer table;
    Py_ssize_t batch;
    if (!PyArg_ParseTuple(args, "y*n", &table, &batch))
        return NULL;
    if (table.len != 256 || batch < 1) {
        PyBuffer_Release(&table);
        PyErr_SetString(PyExc_ValueError, "init(table of 256 bytes, batch >= 1)");
        return NULL;
    }
    memcpy(qos_of, table.buf, 256);
    PyBuffer_Release(&table);
    rate_batch = batch;
    ready = 1;
    Py_RETURN_NONE;
}

static int
check_ready(void)
{
    if (!ready) {
        PyErr_SetString(PyExc_RuntimeError, "proxy.mqtt._walk used before init()");
        return 0;
    }
    return 1;
}

/* A tuple of new references (stolen), or NULL with them released: Py_BuildValue's format
 * parsing was a fifth of a one-message chunk's walk (callgrind). */
static PyObject *
pack(Py_ssize_t size, PyObject **items)
{
    PyObject *t = NULL;
    for (Py_ssize_t i = 0; i < size; i++)
        if (items[i] == NULL)
            goto fail;
    t = PyTuple_New(size);
    if (t == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < size; i++)
        PyTuple_SET_ITEM(t, i, items[i]);
    return t;
fail:
    for (Py_ssize_t i = 0; i < size; i++)
        Py_XDECREF(items[i]);
    return NULL;
}

static PyObject *
answer(Py_ssize_t pos, Py_ssize_t n)
{
    PyObject *items[2] = {PyLong_FromSsize_t(pos), PyLong_FromSsize_t(n)};
    return pack(2, items);
}

/* One PUBLISH at pos, as both walks read it (fastpath.py's shared header walk; here a function
 * the compiler inlines): 1 with its fields, or 0 where the walks stop (not a PUBLISH the walk
 * takes, a QoS above max_qos, a split or oversized packet, a topic or packet id running past
 * the packet, packet id 0, properties). Every byte read lies before the packet's end, itself
 * within the chunk. */
typedef struct {
    Py_ssize_t next;    /* the offset after the packet */
    Py_ssize_t tend;    /* the offset after the topic (the packet id at QoS 1 and 2) */
    Py_ssize_t tlen;    /* the topic's length; it starts at tend - tlen */
    int qos, retain;
} Publish;

static inline int
publish_at(const unsigned char *mv, Py_ssize_t pos, Py_ssize_t end, int max_qos, Py_ssize_t max_size, int v5,
           Publish *p)
{
    unsigned char b1 = mv[pos];
    int qos = qos_of[b1];
    if (qos > max_qos)
        return 0;
    unsigned char b = mv[pos + 1];
    Py_ssize_t body, total;
    if (b < 0x80) {
        body = pos + 2;
        total = 2 + b;
    } else {
        unsigned char b2 = mv[pos + 2];
        if (b2 >= 0x80 || !b2)
            return 0;
        body = pos + 3;
        total = 3 + ((b & 0x7F) | ((Py_ssize_t)b2 << 7));
    }
    Py_ssize_t nxt = pos + total;
    if (total > max_size || nxt > end || body + 2 > nxt)
        return 0;
    Py_ssize_t tlen = ((Py_ssize_t)mv[body] << 8) | mv[body + 1];
    Py_ssize_t tend = body + 2 + tlen;
    Py_ssize_t after = tend + (qos ? 2 : 0) + (v5 ? 1 : 0);
    if (after > nxt || (v5 && mv[after - 1]))
        return 0;
    if (qos && !((mv[tend] << 8) | mv[tend + 1]))
        return 0;  /* packet id 0, either way: the full path closes the connection */
    p->next = nxt;
    p->tend = tend;
    p->tlen = tlen;
    p->qos = qos;
    p->retain = b1 & 1;
    return 1;
}

/* client_publishes(mv, cache, max_size, v5, answered, limiter, sub) -> (pos, n) */
static PyObject *
client_publishes(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "client_publishes takes 7 arguments");
        return NULL;
    }
    if (!check_ready())
        return NULL;
    PyObject *cache = args[1], *answered = args[4], *limiter = args[5], *sub = args[6];
    if (!PyDict_Check(cache) || !PySet_Check(answered)) {
        PyErr_SetString(PyExc_TypeError, "client_publishes: cache must be a dict, answered a set");
        return NULL;
    }
    Py_ssize_t max_size = PyLong_AsSsize_t(args[2]);
    if (max_size == -1 && PyErr_Occurred())
        return NULL;
    int v5 = PyObject_IsTrue(args[3]);
    if (v5 < 0)
        return NULL;
    int limited = limiter != Py_None;

    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *mv = (const unsigned char *)view.buf;
    Py_ssize_t end = view.len;
    Py_ssize_t pos = 0, n = 0, budget = 0, first = 0;
    /* The packet before's key and what the cache said of it (an allowed entry); forgotten after
     * every call out to Python code that could change either (the limiter's take). */
    const unsigned char *last_topic = NULL;
    Py_ssize_t last_len = -1;
    int last_qos = -1, last_retain = -1;
    PyObject *result = NULL;

    if (end < 4) {
        PyBuffer_Release(&view);
        return answer(0, 0);
    }
    while (pos + 2 < end) {
        Publish pub;
        if (!publish_at(mv, pos, end, 1, max_size, v5, &pub))
            break;
        Py_ssize_t nxt = pub.next, tend = pub.tend, tlen = pub.tlen, total = nxt - pos;
        int qos = pub.qos, retain = pub.retain;
        const unsigned char *topic = mv + tend - tlen;
        if (!(tlen == last_len && qos == last_qos && retain == last_retain
              && memcmp(topic, last_topic, (size_t)tlen) == 0)) {
            /* cache.get((topic bytes, qos, retain)); entry[1].allowed */
            PyObject *items[3] = {PyBytes_FromStringAndSize((const char *)topic, tlen), PyLong_FromLong(qos),
                                  PyLong_FromLong(retain)};
            PyObject *key = pack(3, items);
            if (key == NULL)
                goto fail;
            PyObject *entry = PyDict_GetItemWithError(cache, key); /* borrowed */
            Py_DECREF(key);
            if (entry == NULL || entry == Py_None) {   /* (None: as fastpath.py's "is None") */
                if (PyErr_Occurred())
                    goto fail;
                break;
            }
            Py_INCREF(entry);
            PyObject *decision = PySequence_GetItem(entry, 1);
            Py_DECREF(entry);
            if (decision == NULL)
                goto fail;
            PyObject *allowed = PyObject_GetAttr(decision, str_allowed);
            Py_DECREF(decision);
            if (allowed == NULL)
                goto fail;
            int ok = PyObject_IsTrue(allowed);
            Py_DECREF(allowed);
            if (ok < 0)
                goto fail;
            if (!ok)
                break;
            last_topic = topic;
            last_len = tlen;
            last_qos = qos;
            last_retain = retain;
        }
        if (limited) {
            if (!budget) {
                if (!first)
                    first = total;
                Py_ssize_t want = 1 + (end - nxt) / first;
                if (want > rate_batch)
                    want = rate_batch;
                PyObject *got = call_limiter(limiter, str_take, sub, want);
                if (got == NULL)
                    goto fail;
                budget = PyLong_AsSsize_t(got);
                Py_DECREF(got);
                if (budget == -1 && PyErr_Occurred())
                    goto fail;
                /* Python ran (and maybe another thread): the cache or the chunk's bytes may have
                 * changed, so the next packet's key is looked up afresh, as fastpath.py does. */
                last_len = -1;
                if (!budget)
                    break;
            }
            budget -= 1;
        }
        if (qos && PySet_GET_SIZE(answered)) {
            PyObject *pid = PyLong_FromLong((mv[tend] << 8) | mv[tend + 1]);
            if (pid == NULL)
                goto fail;
            int r = PySet_Discard(answered, pid);
            Py_DECREF(pid);
            if (r < 0)
                goto fail;
        }
        n += 1;
        pos = nxt;
    }
    if (budget && limited) {
        PyObject *r = call_limiter(limiter, str_give_back, sub, budget);
        if (r == NULL)
            goto fail;
        Py_DECREF(r);
    }
    result = answer(pos, n);
    PyBuffer_Release(&view);
    return result;
fail:
    PyBuffer_Release(&view);
    return NULL;
}

/* broker_deliveries(mv, exact, cache, v5) -> (pos, n) */
static PyObject *
broker_deliveries(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "broker_deliveries takes 4 arguments");
        return NULL;
    }
    if (!check_ready())
        return NULL;
    PyObject *exact = args[1], *cache = args[2];
    if (!PyAnySet_Check(exact) || !PyDict_Check(cache)) {
        PyErr_SetString(PyExc_TypeError, "broker_deliveries: exact must be a set, cache a dict");
        return NULL;
    }
    int v5 = PyObject_IsTrue(args[3]);
    if (v5 < 0)
        return NULL;

    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *mv = (const unsigned char *)view.buf;
    Py_ssize_t end = view.len;
    Py_ssize_t pos = 0, n = 0;
    /* The last topic found allowed (a subscriber's deliveries repeat a few topics). */
    const unsigned char *last_topic = NULL;
    Py_ssize_t last_len = -1;
    PyObject *result = NULL;

    if (end < 4) {
        PyBuffer_Release(&view);
        return answer(0, 0);
    }
    while (pos + 2 < end) {
        Publish pub;
        if (!publish_at(mv, pos, end, 2, PY_SSIZE_T_MAX, v5, &pub))
            break;
        Py_ssize_t nxt = pub.next, tlen = pub.tlen;
        const unsigned char *topic = mv + pub.tend - tlen;
        if (!(tlen == last_len && memcmp(topic, last_topic, (size_t)tlen) == 0)) {
            /* cache.get(topic) is True, or topic in exact */
            PyObject *key = PyBytes_FromStringAndSize((const char *)topic, tlen);
            if (key == NULL)
                goto fail;
            PyObject *cached = PyDict_GetItemWithError(cache, key); /* borrowed */
            int ok;
            if (cached == Py_True)
                ok = 1;
            else if (cached == NULL && PyErr_Occurred())
                ok = -1;
            else
                ok = PySet_Contains(exact, key);
            Py_DECREF(key);
            if (ok < 0)
                goto fail;
            if (!ok)
                break;
            last_topic = topic;
            last_len = tlen;
        }
        n += 1;
        pos = nxt;
    }
    result = answer(pos, n);
    PyBuffer_Release(&view);
    return result;
fail:
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef walk_methods[] = {
    {"init", walk_init, METH_VARARGS, "init(qos table, rate batch): fastpath.py's tables, once."},
    {"client_publishes", (PyCFunction)(void (*)(void))client_publishes, METH_FASTCALL,
     "fastpath.client_publishes, compiled."},
    {"broker_deliveries", (PyCFunction)(void (*)(void))broker_deliveries, METH_FASTCALL,
     "fastpath.broker_deliveries, compiled."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef walk_module = {
    PyModuleDef_HEAD_INIT, "proxy.mqtt._walk",
    "The fast paths' walk over a chunk of PUBLISH packets, compiled (see fastpath.py).", -1, walk_methods,
};

PyMODINIT_FUNC
PyInit__walk(void)
{
    str_allowed = PyUnicode_InternFromString("allowed");
    str_take = PyUnicode_InternFromString("take");
    str_give_back = PyUnicode_InternFromString("give_back");
    if (str_allowed == NULL || str_take == NULL || str_give_back == NULL)
        return NULL;
    return PyModule_Create(&walk_module);
}
