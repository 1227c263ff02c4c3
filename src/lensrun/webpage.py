"""The page served at ``/``: one self-contained HTML file, no external assets, progress from the events stream."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lensrun</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 15px system-ui, sans-serif; margin: 2rem auto; max-width: 980px; padding: 0 1rem; color: #222; }
 form { display: grid; grid-template-columns: 10rem 1fr; gap: .5rem 1rem; align-items: center; }
 textarea, input, select { font: inherit; padding: .3rem; } textarea { min-height: 4rem; }
 button { grid-column: 2; justify-self: start; padding: .4rem 1.2rem; font: inherit; }
 progress { width: 100%; } #status { min-height: 1.4em; color: #555; }
 #results figure { display: inline-block; margin: .5rem; max-width: 300px; vertical-align: top; }
 #results img { max-width: 300px; display: block; } figcaption { font-size: 12px; white-space: pre-wrap; }
 .error { color: #b00020; }
</style></head><body>
<h1>lensrun <small>{{MODEL}}</small></h1>
<form id="form">
 <label for="prompt">Prompt</label><textarea id="prompt" required></textarea>
 <label for="negative">Negative prompt</label><input id="negative">
 <label for="ratio">Aspect ratio</label>
 <select id="ratio"><option>1:1</option><option>3:4</option><option>4:3</option><option>2:3</option>
  <option>3:2</option><option>9:16</option><option>16:9</option><option>1:2</option><option>2:1</option></select>
 <label for="base">Base resolution</label><select id="base"><option>1024</option><option>1440</option></select>
 <label for="size">Or size (WxH)</label><input id="size" placeholder="e.g. 768x512">
 <label for="steps">Steps</label><input id="steps" type="number" min="1" placeholder="model default">
 <label for="cfg">CFG</label><input id="cfg" type="number" step="0.1" min="0" placeholder="model default">
 <label for="seed">Seed</label><input id="seed" type="number" placeholder="random">
 <label for="key" class="auth">API key</label><input id="key" class="auth" type="password">
 <button id="go" type="submit">Generate</button>
</form>
<p id="status"></p><progress id="bar" value="0" max="1"></progress>
<div id="results"></div>
<script>
const AUTH = {{AUTH}};
if (!AUTH) document.querySelectorAll('.auth').forEach(e => e.style.display = 'none');
const $ = id => document.getElementById(id);
function headers() {
  const h = {'Content-Type': 'application/json'};
  if (AUTH) h['Authorization'] = 'Bearer ' + $('key').value;
  return h;
}
function caption(job, body) {
  const c = job.report || {};
  return [body.size ? 'size ' + body.size : 'base ' + body.base_resolution + ', aspect ' + body.aspect_ratio,
          'steps ' + (body.steps ?? 'default') + ', cfg ' + (body.cfg ?? 'default') + ', seed ' + (body.seed ?? 'random'),
          'plan ' + (c.plan || ''), body.prompt].join('\\n');
}
async function events(id, onEvent) {
  const res = await fetch('/v1/jobs/' + id + '/events', {headers: headers()});
  const reader = res.body.getReader(); const dec = new TextDecoder(); let buf = '';
  for (;;) {
    const {value, done} = await reader.read(); if (done) return;
    buf += dec.decode(value, {stream: true});
    let i; while ((i = buf.indexOf('\\n\\n')) >= 0) {
      const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
      const data = chunk.split('\\n').find(l => l.startsWith('data: '));
      if (data) onEvent(JSON.parse(data.slice(6)));
    }
  }
}
$('form').addEventListener('submit', async ev => {
  ev.preventDefault();
  const body = {prompt: $('prompt').value, negative_prompt: $('negative').value || null,
                aspect_ratio: $('ratio').value, base_resolution: +$('base').value};
  if ($('size').value) { body.size = $('size').value; delete body.aspect_ratio; delete body.base_resolution; }
  if ($('steps').value) body.steps = +$('steps').value;
  if ($('cfg').value) body.cfg = +$('cfg').value;
  if ($('seed').value) body.seed = +$('seed').value;
  $('go').disabled = true; $('status').className = ''; $('status').textContent = 'queued…';
  try {
    const res = await fetch('/v1/jobs', {method: 'POST', headers: headers(), body: JSON.stringify(body)});
    const job = await res.json();
    if (!res.ok) throw new Error(job.error ? job.error.message : res.statusText);
    await events(job.id, e => {
      if (e.event === 'progress') { $('bar').max = e.total; $('bar').value = e.step; $('status').textContent = 'step ' + e.step + ' / ' + e.total; }
      if (e.event === 'running') $('status').textContent = 'running…';
      if (e.event === 'error') throw new Error(e.message);
    });
    const done = await (await fetch('/v1/jobs/' + job.id, {headers: headers()})).json();
    if (done.status !== 'succeeded') throw new Error(done.error || done.status);
    for (const url of done.images) {
      const fig = document.createElement('figure'); const img = document.createElement('img');
      img.src = url; img.alt = body.prompt; const cap = document.createElement('figcaption');
      cap.textContent = caption(done, body); fig.append(img, cap); $('results').prepend(fig);
    }
    $('status').textContent = 'done' + (done.warnings.length ? ' — ' + done.warnings.join('; ') : '');
  } catch (err) { $('status').className = 'error'; $('status').textContent = String(err.message || err); }
  finally { $('go').disabled = false; }
});
</script></body></html>
"""
