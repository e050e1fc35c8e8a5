/* The tap's per-read scan over server-sent events, in C: the same answer as the Python loop in
 * sidecar/tap/observe.py (`templated_py`), which stays as the fallback when this module is not built.
 *
 * templated(data, end, head, tail) -> (at, last, count)
 *
 * From the start of data[:end], take the events that have the stream's template shape: `head`, then a
 * non-empty JSON string's text (its first byte not a quote), then `tail` right after the quote that closes
 * that string. Head and tail are compared with digits 1-9 read as '0'. Returns the end of the last event
 * taken, where that event started, and how many were taken (0, 0, 0 when none).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline int
same_byte(unsigned char c, unsigned char shape)
{
    return c == shape || (shape == '0' && c >= '1' && c <= '9');
}

/* bytes[:size] read with digits 1-9 as '0' equals shape[:size]. Eight bytes at a time: most words hold no
 * digit other than '0' and compare equal as they are. */
static inline int
same_shape(const unsigned char *bytes, const unsigned char *shape, Py_ssize_t size)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= size; i += 8) {
        uint64_t a, b;
        memcpy(&a, bytes + i, 8);
        memcpy(&b, shape + i, 8);
        if (a == b)
            continue;
        for (int k = 0; k < 8; k++)
            if (!same_byte(bytes[i + k], shape[i + k]))
                return 0;
    }
    for (; i < size; i++)
        if (!same_byte(bytes[i], shape[i]))
            return 0;
    return 1;
}

/* The quote that closes the string whose text starts at `text` (a quote after an odd run of backslashes is
 * escaped), or -1 before `end`. */
static inline Py_ssize_t
string_end(const unsigned char *d, Py_ssize_t text, Py_ssize_t end)
{
    Py_ssize_t i = text + 1;
    while (i < end) {
        const unsigned char *q = memchr(d + i, '"', (size_t)(end - i));
        if (q == NULL)
            return -1;
        i = q - d;
        Py_ssize_t run = 0;
        while (i - 1 - run >= text && d[i - 1 - run] == '\\')
            run++;
        if (run % 2 == 0)
            return i;
        i++;
    }
    return -1;
}

static PyObject *
templated(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[2]) || !PyBytes_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "templated(data: bytes, end: int, head: bytes, tail: bytes)");
        return NULL;
    }
    Py_ssize_t end = PyLong_AsSsize_t(args[1]);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    const unsigned char *head = (const unsigned char *)PyBytes_AS_STRING(args[2]);
    const unsigned char *tail = (const unsigned char *)PyBytes_AS_STRING(args[3]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t head_len = PyBytes_GET_SIZE(args[2]), tail_len = PyBytes_GET_SIZE(args[3]);
    if (end > size)
        end = size;
    Py_ssize_t at = 0, last = 0, count = 0;
    while (end > 0) {
        Py_ssize_t text = at + head_len;
        if (text >= end || d[text] == '"' || !same_shape(d + at, head, head_len))
            break;
        Py_ssize_t close = string_end(d, text, end);
        if (close < 0 || close + tail_len > end || !same_shape(d + close, tail, tail_len))
            break;
        last = at;
        at = close + tail_len;
        count++;
        if (at >= end)
            break;
    }
    return Py_BuildValue("nnn", at, last, count);
}

static PyMethodDef methods[] = {
    {"templated", (PyCFunction)(void (*)(void))templated, METH_FASTCALL,
     "templated(data, end, head, tail) -> (at, last, count): the events at the start of data[:end] with "
     "the template's shape."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scan", "The tap's per-read scan, in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModule_Create(&module);
}
