/* The router's dashboard (GET /dashboard): reads GET /v1/stats every REFRESH_MS and draws
   it with uPlot (vendored beside this file, MIT). Same origin only: the page's requests
   carry the cookie /dashboard?token=... set, or nothing where the server has no token.

   window.dashboard holds what scripts and tests read: `last` (the stats drawn last),
   `charts` (id -> uPlot), `refreshes`, `errors`, and `drawn(id)`: {points, pixels,
   markers}, the data points a chart holds, the canvas pixels in its series' colours and
   the reload markers it drew. */
(function () {
  'use strict';
  const REFRESH_MS = 5000;
  const HEIGHT = 240;
  const PALETTE = ['#3366cc', '#e67e22', '#27ae60', '#8e44ad', '#16a085', '#d4ac0d',
                   '#2c3e50', '#e84393', '#7f8c8d', '#1abc9c', '#6d4c41', '#5c6bc0'];
  const MARKER = '#c0392b';
  const DASH = '–';
  const state = {last: null, charts: {}, keys: {}, colors: {}, markers: {}, refreshes: 0,
                 errors: 0, range: [0, 1], drawn: drawn};
  window.dashboard = state;

  // ------------------------------------------------------------ numbers ---
  function get(obj, path) {
    return path.split('.').reduce((o, k) => (o == null ? undefined : o[k]), obj);
  }

  function usd(v) {
    const a = Math.abs(v);
    const s = a >= 100 ? a.toFixed(2) : String(Number(a.toPrecision(4)));
    return (v < 0 ? '-$' : '$') + s;
  }

  function ms(v) {
    return (v < 10 ? v.toFixed(2) : v < 1000 ? v.toFixed(1) : v.toFixed(0)) + ' ms';
  }

  function short(v) {
    return String(Number(v.toPrecision(4)));
  }

  function when(t) {
    return new Date(t * 1000).toLocaleString('en-GB', {hour12: false});
  }

  const FORMATS = {
    text: String,
    int: v => Math.round(v).toLocaleString('en-US'),
    usd: usd,
    pct: v => (100 * v).toFixed(1) + '%',
    ms: ms,
    time: when,
  };

  /** Every [data-stat] element shows its value of `stats` (data-value: the raw JSON value). */
  function fill(stats) {
    for (const el of document.querySelectorAll('[data-stat]')) {
      const v = get(stats, el.dataset.stat);
      el.dataset.value = v == null ? '' : String(v);
      el.textContent = v == null ? DASH : FORMATS[el.dataset.format || 'text'](v);
    }
    document.getElementById('models').textContent = stats.router.models.join(', ');
  }

  function row(cells) {
    const tr = document.createElement('tr');
    for (const [text, cls] of cells) {
      const td = document.createElement('td');
      td.textContent = text;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    return tr;
  }

  /** The range's choices in time: "last hour" and so on, from the history's shape. */
  function ranges(stats) {
    const span = s => (s % 86400 === 0 ? s / 86400 + ' d' : s % 3600 === 0 ? s / 3600 + ' h'
                       : s % 60 === 0 ? s / 60 + ' min' : s + ' s');
    for (const option of document.getElementById('range').options) {
      const n = option.value ? Number(option.value) : stats.history.buckets;
      option.textContent = (option.value ? 'last ' : 'all kept: ') +
                           span(n * stats.history.bucket_s);
    }
  }

  function tables(stats) {
    const feedback = document.querySelector('#feedback tbody');
    feedback.replaceChildren(...Object.keys(stats.feedback).sort().map(m => row([
        [m], [String(stats.feedback[m].count), 'num'],
        [stats.feedback[m].mean.toFixed(3), 'num']])));
    if (!Object.keys(stats.feedback).length) {
      feedback.replaceChildren(row([[stats.decision_log ? 'no scores yet'
                                     : 'needs --decisions (POST /v1/feedback)']]));
    }
    const reloads = document.querySelector('#reloads tbody');
    const recent = stats.reloads.slice(-20).reverse();
    reloads.replaceChildren(...recent.map(r => row([[when(r.time)], [r.version], [r.previous]])));
    if (!recent.length) reloads.replaceChildren(row([['none in this history']]));

    const c = stats.calibration, e = c.expected || {};
    const items = [
      ['cost weight λ', c.cost_weight == null ? DASH : short(c.cost_weight)],
      ['threshold', c.threshold == null ? DASH : short(c.threshold)],
      ['calibrated', c.calibrated ? (c.created || 'yes') : 'no: the trained setting'],
      ['expected accuracy', e.accuracy == null ? DASH : e.accuracy.toFixed(4)],
      ['expected cost / query', e.cost_per_query == null ? DASH : usd(e.cost_per_query)],
      ['actual cost / query', stats.spend.priced ? usd(stats.spend.actual / stats.spend.priced)
                                                 : DASH],
      ['expected share on the strongest', e.strong_share == null ? DASH
                                          : (100 * e.strong_share).toFixed(1) + '%'],
      ['target', c.target ? Object.entries(c.target).map(([k, v]) => k + ' ' + v).join(', ')
                          : DASH],
    ];
    document.getElementById('calibration').replaceChildren(...items.flatMap(([k, v]) => {
      const dt = document.createElement('dt'), dd = document.createElement('dd');
      dt.textContent = k;
      dd.textContent = v;
      return [dt, dd];
    }));
  }

  // ------------------------------------------------------------- charts ---
  /** uPlot plugin: a dashed line and the version at each reload of the stats. */
  function markers(id) {
    return {hooks: {draw: [u => {
      const reloads = (state.last && state.last.reloads) || [];
      const px = window.devicePixelRatio || 1;
      const {left, top, width, height} = u.bbox;
      const ctx = u.ctx;
      let drawn = 0;
      ctx.save();
      ctx.strokeStyle = MARKER;
      ctx.fillStyle = MARKER;
      ctx.lineWidth = 2 * px;
      ctx.setLineDash([6 * px, 4 * px]);
      ctx.font = (11 * px) + 'px system-ui, sans-serif';
      for (const r of reloads) {
        const x = Math.round(u.valToPos(r.time, 'x', true));
        if (!(x >= left && x <= left + width)) continue;
        ctx.beginPath();
        ctx.moveTo(x, top);
        ctx.lineTo(x, top + height);
        ctx.stroke();
        ctx.fillText('reload ' + String(r.version).slice(0, 8), x + 4 * px, top + 12 * px);
        drawn += 1;
      }
      ctx.restore();
      state.markers[id] = drawn;
    }]}};
  }

  function color(i) {
    return PALETTE[i % PALETTE.length];
  }

  function tint(hex, alpha) {
    return hex + Math.round(alpha * 255).toString(16).padStart(2, '0');
  }

  function nonNegative(u, min, max) {
    return [0, Math.max(1e-9, max == null ? 1 : max) * 1.05];
  }

  function axis(opts) {
    return Object.assign({stroke: '#5b6577', grid: {stroke: '#eef1f5'},
                          ticks: {stroke: '#dde2ea'}}, opts);
  }

  function msValue(u, v) {
    return v == null ? DASH : ms(v);
  }

  function ratePerBucket(s, key) {
    const d = s.series.decisions;
    return s.series[key].map((v, i) => (d[i] ? 100 * v / d[i] : null));
  }

  /** Each chart: its series, scales, axes and data from the stats; `key` changes when the
      series do (a reload with other models): the chart is then built anew. */
  const CHARTS = {
    'chart-routes': s => {
      const models = Object.keys(s.series.routes);
      let acc = s.series.t.map(() => 0);
      const stacked = models.map(m => (acc = acc.map((a, i) => a + s.series.routes[m][i])));
      const order = models.map((m, i) => i).reverse();   // the top of the stack drawn first
      return {
        key: models.join('|'),
        series: order.map(i => ({
          label: models[i], stroke: color(i), fill: tint(color(i), 0.35), width: 1.5,
          value: (u, v, si, idx) => {
            const own = state.last && state.last.series.routes[models[i]];
            return idx == null || !own || own[idx] == null ? DASH : String(own[idx]);
          }})),
        scales: {y: {range: nonNegative}},
        axes: [axis({}), axis({label: 'decisions'})],
        data: order.map(i => stacked[i]),
      };
    },
    'chart-explore': s => ({
      key: 'explore',
      series: [
        {label: 'explored %', scale: '%', stroke: color(0), width: 2,
         value: (u, v) => (v == null ? DASH : v.toFixed(1) + '%')},
        {label: 'to another model %', scale: '%', stroke: color(3), width: 2,
         value: (u, v) => (v == null ? DASH : v.toFixed(1) + '%')},
        {label: 'fallbacks', scale: 'n', stroke: color(1), width: 2},
        {label: 'failed', scale: 'n', stroke: color(6), width: 2, dash: [4, 3]},
      ],
      scales: {'%': {range: [0, 100]}, n: {range: nonNegative}},
      axes: [axis({}), axis({scale: '%', values: (u, vs) => vs.map(v => v + '%')}),
             axis({scale: 'n', side: 1, grid: {show: false}})],
      data: [ratePerBucket(s, 'explored'), ratePerBucket(s, 'switched'), s.series.fallbacks,
             s.series.failed],
    }),
    'chart-spend': s => {
      const perHour = 3600 / s.series.bucket_s;
      return {
        key: 'spend',
        series: [
          {label: 'routed $/h', stroke: color(2), fill: tint(color(2), 0.15), width: 2,
           value: (u, v) => (v == null ? DASH : usd(v))},
          {label: 'always ' + s.spend.strongest_model + ' $/h (estimate)', stroke: color(1),
           width: 2, dash: [6, 3], value: (u, v) => (v == null ? DASH : usd(v))},
        ],
        scales: {y: {range: nonNegative}},
        axes: [axis({}), axis({size: 70, values: (u, vs) => vs.map(v => usd(v))})],
        data: [s.series.spend.actual.map(v => v * perHour),
               s.series.spend.strongest_only.map(v => v * perHour)],
      };
    },
    'chart-feedback': s => {
      const models = Object.keys(s.series.feedback).sort();
      return {
        key: models.join('|'),
        series: models.map((m, i) => ({
          label: m, stroke: color(s.router.models.indexOf(m) >= 0 ? s.router.models.indexOf(m)
                                                                  : i + 6),
          width: 2, spanGaps: true, points: {show: true, size: 7},
          value: (u, v) => (v == null ? DASH : v.toFixed(3))})),
        scales: {y: {range: [0, 1]}},
        axes: [axis({}), axis({label: 'mean score'})],
        data: models.map(m => s.series.feedback[m].mean),
      };
    },
    'chart-routing': s => ({
      key: 'routing',
      series: [
        {label: 'routing p50', stroke: color(0), width: 2, value: msValue},
        {label: 'routing p95', stroke: color(3), width: 2, dash: [6, 3],
         value: msValue},
      ],
      scales: {y: {range: nonNegative}},
      axes: [axis({}), axis({label: 'ms'})],
      data: [s.series.latency_ms.routing.p50, s.series.latency_ms.routing.p95],
    }),
    'chart-upstream': s => ({
      key: 'upstream',
      series: [
        {label: 'upstream p50', stroke: color(2), width: 2, value: msValue},
        {label: 'upstream p95', stroke: color(4), width: 2, dash: [6, 3],
         value: msValue},
        {label: 'answer p50', stroke: color(0), width: 1.5, value: msValue},
        {label: 'answer p95', stroke: color(3), width: 1.5, dash: [2, 3],
         value: msValue},
      ],
      scales: {y: {range: nonNegative}},
      axes: [axis({}), axis({label: 'ms'})],
      data: [s.series.latency_ms.upstream.p50, s.series.latency_ms.upstream.p95,
             s.series.latency_ms.request.p50, s.series.latency_ms.request.p95],
    }),
  };

  function draw(stats) {
    const t = stats.series.t;
    const last = t.length ? t[t.length - 1] : stats.time;
    state.range = [t.length ? t[0] : stats.time - stats.history.bucket_s,
                   Math.max(stats.time, last + 1)];
    for (const [id, build] of Object.entries(CHARTS)) {
      const el = document.getElementById(id);
      const spec = build(stats);
      const data = [t, ...spec.data];
      let u = state.charts[id];
      if (u && state.keys[id] !== spec.key) {
        u.destroy();
        u = null;
      }
      if (!u) {
        u = new uPlot({
          width: Math.max(300, el.clientWidth), height: HEIGHT,
          series: [{}, ...spec.series],
          scales: Object.assign({x: {time: true, range: () => state.range}}, spec.scales),
          axes: spec.axes,
          cursor: {drag: {x: false, y: false}},
          legend: {live: true},
          plugins: [markers(id)],
        }, data, el);
        state.charts[id] = u;
        state.keys[id] = spec.key;
        state.colors[id] = spec.series.map(x => x.stroke);
      } else {
        u.setData(data);
      }
      // The legend: the last whole bucket's values (the current one is still filling) until
      // hovered; after uPlot's own update of it.
      const idx = Math.max(0, t.length - 2);
      setTimeout(() => u.setLegend({idx: idx}), 0);
    }
    const note = document.getElementById('feedback-note');
    note.hidden = Object.keys(stats.series.feedback).length > 0;
    note.textContent = stats.decision_log ? 'No scores in this history yet (POST /v1/feedback).'
                                          : 'Scores need a decision log: serve --decisions=DIR.';
  }

  /** {points, pixels, markers} of chart `id`: the data points it holds, the canvas pixels
      in its series' colours (what was drawn of them) and the reload markers it drew. */
  function drawn(id) {
    const u = state.charts[id];
    if (!u) return null;
    const points = u.data.slice(1).reduce(
        (n, s) => n + s.filter(v => v != null && Number.isFinite(v)).length, 0);
    const rgbs = state.colors[id].map(h => [1, 3, 5].map(k => parseInt(h.slice(k, k + 2), 16)));
    const canvas = u.ctx.canvas;
    const img = u.ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let pixels = 0;
    for (let p = 0; p < img.length; p += 4) {
      if (img[p + 3] < 250) continue;
      for (const [r, g, b] of rgbs) {
        if (Math.abs(img[p] - r) + Math.abs(img[p + 1] - g) + Math.abs(img[p + 2] - b) < 30) {
          pixels += 1;
          break;
        }
      }
    }
    return {points: points, pixels: pixels, markers: state.markers[id] || 0};
  }

  // ------------------------------------------------------------ refresh ---
  function status(text, error) {
    const el = document.getElementById('status');
    el.textContent = text;
    el.classList.toggle('error', !!error);
  }

  async function refresh() {
    const buckets = document.getElementById('range').value;
    try {
      const reply = await fetch('v1/stats' + (buckets ? '?buckets=' + buckets : ''),
                                {credentials: 'same-origin', cache: 'no-store'});
      if (!reply.ok) {
        let message = 'HTTP ' + reply.status;
        try { message += ': ' + (await reply.json()).error.message; } catch (e) { /* not JSON */ }
        throw new Error(reply.status === 401
            ? 'not signed in: open /dashboard?token=<the bearer token> once (' + message + ')'
            : message);
      }
      const stats = await reply.json();
      state.last = stats;
      ranges(stats);
      fill(stats);
      tables(stats);
      draw(stats);
      state.refreshes += 1;
      status('updated ' + new Date().toLocaleTimeString('en-GB', {hour12: false}) +
             ' · every ' + REFRESH_MS / 1000 + ' s');
    } catch (e) {
      state.errors += 1;
      status('refresh failed: ' + e.message, true);
    }
  }

  let timer = null, busy = false;
  /** Refreshes now (unless a refresh is under way: it schedules the next) and every
      REFRESH_MS after; a tab out of sight asks for nothing. */
  async function schedule() {
    clearTimeout(timer);
    if (busy) return;
    if (!(document.hidden && state.refreshes)) {
      busy = true;
      try {
        await refresh();
      } finally {
        busy = false;
      }
    }
    timer = setTimeout(schedule, REFRESH_MS);
  }
  document.addEventListener('visibilitychange', () => { if (!document.hidden) schedule(); });

  let resizing = null;
  window.addEventListener('resize', () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => {
      for (const [id, u] of Object.entries(state.charts)) {
        u.setSize({width: Math.max(300, document.getElementById(id).clientWidth), height: HEIGHT});
      }
    }, 150);
  });
  // ?range=60|360|all picks the history shown (all: every bucket kept); a change is kept
  // in the address, so that reopening it shows the same.
  const picker = document.getElementById('range');
  const asked = new URLSearchParams(location.search).get('range');
  if (asked !== null) {
    const value = asked === 'all' ? '' : asked;
    if ([...picker.options].some(o => o.value === value)) picker.value = value;
  }
  picker.addEventListener('change', () => {
    const url = new URL(location.href);
    url.searchParams.set('range', picker.value || 'all');
    history.replaceState(null, '', url);
    schedule();
  });
  schedule();
})();
