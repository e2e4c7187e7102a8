/* A deployed codebook KAN layer in one call (bench/deploy/native.py compiles and loads this file).
 *
 * For each sample b:
 *   f[i][e]  the layer's features of input i: its basis values (e < E - 1), then silu(x_i) (e = E - 1)
 *   T[i][k]  = sum_e f[i][e] * C[k][e]          (K centroid functions evaluated at input i)
 *   y[b][o]  = bias[o] + sum_i T[i][index[o][i]] (each edge's function, gathered by its index)
 * The [out, in, E] edge tensor is never built; per sample the work is in*E*K multiply-adds and out*in
 * gathered adds, against out*in*E multiply-adds for the dense layer.
 *
 * Basis kinds (the values torch computes in bench/model/bases.py, in float32):
 *   0  features given: f is read from `feats` [B, in, E] (any basis torch evaluates)
 *   1  uniform cubic B-spline: p = {lo, hi, grid, clamp}
 *   2  Gaussian RBF: p = {n_centers, inv_width, use_norm, eps, centers[n], norm weight[in], norm bias[in]}
 *   3  Chebyshev, 4  Gram: p = {degree, margin}
 *   5  Fourier: p = {frequencies}
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KAN_PI 3.14159265358979323846

/* exp(v) in float32 to about 1 ulp, in a form the compiler vectorises (glibc's expf is a scalar call
 * unless -ffast-math, which would also let it assume no infinities): Cody-Waite reduction (n by the
 * 1.5 * 2^23 rounding trick: floorf is a call that stops vectorisation) to r = v - n ln2, Cephes'
 * degree-6 polynomial, 2^n from the exponent bits (n = 128 as 2^127 * 2). Below -87.33 it returns 0
 * (expf gives a subnormal under 1.2e-38 there), above ln(FLT_MAX) infinity, NaN as NaN. */
static inline float kexp(float v) {
    float c = v < -87.33f ? -87.33f : (v > 88.72283f ? 88.72283f : v);
    float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* to nearest: 1.5 * 2^23 */
    float r = c - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t ni = (int32_t)n, top = ni > 127;
    int32_t bits = (ni - top + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float e = p * scale * (top ? 2.0f : 1.0f);
    return v != v ? v : (v < -87.33f ? 0.0f : (v > 88.72284f ? INFINITY : e));
}

static inline float silu(float v) { return v / (1.0f + kexp(-v)); }

static float squash(float v, float margin) {
    float t = tanhf(v);
    float lo = -1.0f + margin, hi = 1.0f - margin;
    return t < lo ? lo : (t > hi ? hi : t);
}

/* the features of one sample's `in` inputs into f [in, E]; 0 on success */
static int features(int kind, const float *p, int in, int E, const float *x, float *f) {
    int nb = E - 1;
    if (kind == 1) {
        float lo = p[0], hi = p[1];
        int grid = (int)p[2], clamp = p[3] != 0.0f;
        float top = (float)((double)p[1] - 1e-6 * ((double)p[1] - (double)p[0]));
        float inv_h = (float)(1.0 / (((double)hi - (double)lo) / grid));
        for (int i = 0; i < in; i++) {
            float v = x[i];
            if (clamp) v = v < lo ? lo : (v > top ? top : v);
            float u = (v - lo) * inv_h + 3.0f;
            float *fi = f + (size_t)i * E;
            for (int j = 0; j < nb; j++) {
                float a = fabsf(u - (float)(j + 2));
                float far = 2.0f - a, near = 1.0f - a;
                far = far > 0.0f ? far : 0.0f;
                near = near > 0.0f ? near : 0.0f;
                fi[j] = (far * far * far - 4.0f * (near * near * near)) * (float)(1.0 / 6.0);
            }
            fi[nb] = silu(x[i]);
        }
        return 0;
    }
    if (kind == 2) {
        int nc = (int)p[0];
        float w = p[1];
        int use_norm = p[2] != 0.0f;
        float eps = p[3];
        const float *centers = p + 4, *nw = p + 4 + nc, *nbias = p + 4 + nc + in;
        float mean = 0.0f, rstd = 1.0f;
        if (use_norm) {
            double s = 0.0, s2 = 0.0;
            for (int i = 0; i < in; i++) s += x[i];
            double m = s / in;
            for (int i = 0; i < in; i++) s2 += ((double)x[i] - m) * ((double)x[i] - m);
            mean = (float)m;
            rstd = (float)(1.0 / sqrt(s2 / in + (double)eps));
        }
        for (int i = 0; i < in; i++) {
            float v = use_norm ? (x[i] - mean) * rstd * nw[i] + nbias[i] : x[i];
            float *fi = f + (size_t)i * E;
#pragma omp simd
            for (int j = 0; j < nb; j++) {
                float z = (v - centers[j]) * w;
                fi[j] = kexp(-(z * z));
            }
            fi[nb] = silu(x[i]);
        }
        return 0;
    }
    if (kind == 3 || kind == 4) {
        int degree = (int)p[0];
        float margin = p[1];
        float m = (float)(degree + 1);
        for (int i = 0; i < in; i++) {
            float t = squash(x[i], margin);
            float *fi = f + (size_t)i * E;
            fi[0] = 1.0f;
            if (degree >= 1) fi[1] = t;
            for (int n = 2; n <= degree; n++) {
                if (kind == 3) {
                    fi[n] = 2.0f * t * fi[n - 1] - fi[n - 2];
                } else {
                    double k = n - 1;
                    float beta = (float)(k * k * ((double)m * m - k * k) / ((double)m * m * (4.0 * k * k - 1.0)));
                    fi[n] = t * fi[n - 1] - beta * fi[n - 2];
                }
            }
            fi[nb] = silu(x[i]);
        }
        return 0;
    }
    if (kind == 5) {
        /* cos(k a), sin(k a) for a = pi tanh(x), k = 1..fr: tanh from kexp, sin and cos of a / 2 by
         * their Taylor series (|a / 2| <= pi / 2: truncation under 6e-8), doubled, then angle addition
         * for k >= 2; one vectorised pass over the inputs, no libm call (cosf/sinf/tanhf per value were
         * half the kernel's time). Within 2e-6 of torch's float32 values. */
        int fr = (int)p[0];
#pragma omp simd
        for (int i = 0; i < in; i++) {
            float v = x[i];
            float t = 1.0f - 2.0f / (kexp(2.0f * v) + 1.0f);
            float h = (float)(KAN_PI / 2.0) * t, h2 = h * h;
            float sh = h * (1.0f + h2 * (-1.0f / 6 + h2 * (1.0f / 120 + h2 * (-1.0f / 5040 + h2 * (1.0f / 362880
                       + h2 * (-1.0f / 39916800))))));
            float ch = 1.0f + h2 * (-0.5f + h2 * (1.0f / 24 + h2 * (-1.0f / 720 + h2 * (1.0f / 40320
                       + h2 * (-1.0f / 3628800 + h2 * (1.0f / 479001600))))));
            float *fi = f + (size_t)i * E;
            fi[0] = ch * ch - sh * sh;
            fi[fr] = 2.0f * sh * ch;
            fi[nb] = silu(v);
        }
        for (int i = 0; i < in; i++) {
            float *fi = f + (size_t)i * E;
            float c1 = fi[0], s1 = fi[fr];
            for (int k = 1; k < fr; k++) {
                fi[k] = fi[k - 1] * c1 - fi[fr + k - 1] * s1;
                fi[fr + k] = fi[fr + k - 1] * c1 + fi[k - 1] * s1;
            }
        }
        return 0;
    }
    return 1;
}

/* y [B, out] of a codebook layer; ct is the codebook transposed, [E, K]; index [out, in] holds uint8
 * (index_bytes 1) or int16 (2) values; feats [B, in, E] only for kind 0. Returns 0, or 1 for an unknown
 * kind, 2 when out of memory. */
int kan_codebook_forward(int B, int in, int out, int E, int K, const float *x, const float *feats, int kind,
                         const float *params, const float *ct, const void *index, int index_bytes,
                         const float *bias, float *y) {
    float *f = kind == 0 ? NULL : (float *)malloc(sizeof(float) * (size_t)in * E);
    float *T = (float *)malloc(sizeof(float) * (size_t)in * K);
    if ((kind != 0 && f == NULL) || T == NULL) {
        free(f);
        free(T);
        return 2;
    }
    int status = 0;
    for (int b = 0; b < B && status == 0; b++) {
        const float *fb = feats ? feats + (size_t)b * in * E : f;
        if (kind != 0) status = features(kind, params, in, E, x + (size_t)b * in, f);
        if (status) break;
        for (int i = 0; i < in; i++) {  /* T[i][:] = sum_e f[i][e] * ct[e][:] */
            float *Ti = T + (size_t)i * K;
            const float *fi = fb + (size_t)i * E;
            for (int k = 0; k < K; k++) Ti[k] = 0.0f;
            for (int e = 0; e < E; e++) {
                float v = fi[e];
                const float *c = ct + (size_t)e * K;
#pragma omp simd
                for (int k = 0; k < K; k++) Ti[k] += v * c[k];
            }
        }
        float *yb = y + (size_t)b * out;
        for (int o = 0; o < out; o++) {
            float acc = 0.0f;
            if (index_bytes == 1) {
                const uint8_t *io = (const uint8_t *)index + (size_t)o * in;
#pragma omp simd reduction(+ : acc)
                for (int i = 0; i < in; i++) acc += T[(size_t)i * K + io[i]];
            } else {
                const int16_t *io = (const int16_t *)index + (size_t)o * in;
#pragma omp simd reduction(+ : acc)
                for (int i = 0; i < in; i++) acc += T[(size_t)i * K + io[i]];
            }
            yb[o] = bias ? acc + bias[o] : acc;
        }
    }
    free(f);
    free(T);
    return status;
}
