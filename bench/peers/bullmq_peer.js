// Peer of issue 15: BullMQ worker + Nodemailer pool transport in ONE Node process.
//
//   node bullmq_peer.js enqueue                        # JSON array of job data on stdin -> Queue.addBulk
//   node bullmq_peer.js work --concurrency C --messages N
//
// Environment (set by the harness): REDIS_URL (the bench's private Redis), SMTP_URL
// (smtp://127.0.0.1:PORT, the delay proxy in front of the sink), BULLMQ_QUEUE (queue name),
// NODE_PATH (bench/.peers/node_modules, installed by bench/peers/__init__.py).
//
// `work` is the bench's "burst" worker: BullMQ has no burst mode, so it exits once N jobs have completed
// or failed (N = 0: as soon as the worker is connected and ready, for the start-up CPU measurement).
// Nodemailer: `pool: true, maxConnections: C, maxMessages: Infinity` (the default of 100 messages per
// connection would reconnect; our worker and the smtplib baselines keep their connection), no TLS
// (the sink offers none), defaults otherwise. BullMQ: Worker `concurrency: C`, default job options
// (completed jobs are kept, as rq keeps results).
'use strict';

const { Queue, Worker } = require('bullmq');
const nodemailer = require('nodemailer');

const REDIS_URL = process.env.REDIS_URL;
const QUEUE = process.env.BULLMQ_QUEUE || 'bench-bullmq';
const connection = { url: REDIS_URL, maxRetriesPerRequest: null };

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

async function enqueue() {
  const datas = JSON.parse(await readStdin());
  const queue = new Queue(QUEUE, { connection });
  for (let i = 0; i < datas.length; i += 1000) {
    await queue.addBulk(datas.slice(i, i + 1000).map((data) => ({ name: 'send', data })));
  }
  await queue.close();
  process.stdout.write(JSON.stringify({ enqueued: datas.length }) + '\n');
}

async function work() {
  const concurrency = arg('--concurrency', 1);
  const messages = arg('--messages', 0);
  const smtp = new URL(process.env.SMTP_URL);
  const transporter = nodemailer.createTransport({
    pool: true,
    maxConnections: concurrency,
    maxMessages: Infinity,
    host: smtp.hostname,
    port: Number(smtp.port),
    secure: false,
    ignoreTLS: true,
    name: 'bench.example',
  });
  let done = 0;
  let failed = 0;
  let closing = false;
  const worker = new Worker(
    QUEUE,
    async (job) => {
      const mail = job.data.mail;
      const info = await transporter.sendMail({
        from: mail.from,
        to: mail.to,
        subject: mail.subject,
        text: mail.text,
        headers: mail.headers,
      });
      return info.messageId;
    },
    { connection, concurrency },
  );
  const finish = async () => {
    if (closing) return;
    closing = true;
    await worker.close();
    transporter.close();
    process.exit(failed ? 1 : 0);
  };
  const count = () => {
    done += 1;
    if (done >= messages) finish();
  };
  worker.on('completed', count);
  worker.on('failed', (job, err) => {
    failed += 1;
    process.stderr.write(`bullmq job ${job && job.id} failed: ${err && err.message}\n`);
    count();
  });
  worker.on('error', (err) => process.stderr.write(`bullmq worker error: ${err && err.message}\n`));
  await worker.waitUntilReady();
  if (messages <= 0) await finish();
}

const mode = process.argv[2];
(mode === 'enqueue' ? enqueue() : mode === 'work' ? work() : Promise.reject(new Error(`mode? ${mode}`)))
  .catch((err) => {
    process.stderr.write(`bullmq_peer ${mode}: ${err && err.stack}\n`);
    process.exit(2);
  });
