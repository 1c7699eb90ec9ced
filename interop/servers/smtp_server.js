'use strict';
// Nodemailer's smtp-server as an interop MTA: listens on 127.0.0.1, offers STARTTLS with the test
// certificate and AUTH PLAIN/LOGIN, refuses refused@example.test at RCPT with 550, accepts every other
// recipient of example.test and relays each message (raw bytes, envelope kept) to the counting sink
// before it answers the final dot: 250 means the sink has it, 451 means it does not.
//
// Usage: node smtp_server.js CONFIG.json   (written by interop/servers/smtp_server.py)
// Modules come from NODE_PATH (the launcher's npm cache). Only loopback addresses are ever used.

const fs = require('fs');
const { SMTPServer } = require('smtp-server');
const SMTPConnection = require('nodemailer/lib/smtp-connection');

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const DOMAIN = config.domain;
const REFUSED = config.refused.toLowerCase();
const LOOPBACK = '127.0.0.1';

function log(event, fields) {
    process.stdout.write(JSON.stringify({ time: new Date().toISOString(), event, ...fields }) + '\n');
}

function relay(envelope, raw, callback) {
    const connection = new SMTPConnection({
        host: LOOPBACK,
        port: config.relay_port,
        secure: false,
        ignoreTLS: true,
        name: 'smtp-server.localhost',
        connectionTimeout: 10000,
        greetingTimeout: 10000,
        socketTimeout: 60000
    });
    let finished = false;
    const done = (err, info) => {
        if (finished) {
            return;
        }
        finished = true;
        try {
            connection.quit();
        } catch (_e) {
            connection.close();
        }
        callback(err, info);
    };
    connection.on('error', err => done(err));
    connection.connect(() => {
        connection.send(
            {
                from: envelope.from,
                to: envelope.to,
                use8BitMime: envelope.eightBit,
                size: raw.length
            },
            raw,
            (err, info) => done(err, info)
        );
    });
}

function inDomain(address) {
    const at = address.lastIndexOf('@');
    return at > 0 && address.slice(at + 1).toLowerCase() === DOMAIN;
}

const server = new SMTPServer({
    name: 'smtp-server.localhost',
    banner: `interop smtp-server ${config.version}`,
    key: fs.readFileSync(config.key_pem),
    cert: fs.readFileSync(config.cert_pem),
    authMethods: ['PLAIN', 'LOGIN'],
    authOptional: true,
    hideENHANCEDSTATUSCODES: false, // the library hides these two by default; real MTAs offer them
    hideDSN: false,
    allowInsecureAuth: false,
    size: config.size,
    rejectOversized: true,
    logger: false,
    onConnect(session, callback) {
        log('connect', { id: session.id, remote: session.remoteAddress });
        callback();
    },
    onAuth(auth, session, callback) {
        const ok = auth.username === config.username && auth.password === config.password;
        log('auth', { id: session.id, method: auth.method, user: auth.username, ok });
        if (!ok) {
            return callback(new Error('Invalid username or password'));
        }
        callback(null, { user: auth.username });
    },
    onMailFrom(address, session, callback) {
        log('mail', { id: session.id, from: address.address, args: address.args });
        callback();
    },
    onRcptTo(address, session, callback) {
        const rcpt = address.address;
        if (rcpt.toLowerCase() === REFUSED) {
            log('rcpt_refused', { id: session.id, to: rcpt });
            const err = new Error('5.1.1 <' + rcpt + '>: Recipient address rejected: refused by interop rule');
            err.responseCode = 550;
            return callback(err);
        }
        if (!inDomain(rcpt)) {
            const err = new Error('5.7.1 <' + rcpt + '>: Relay access denied');
            err.responseCode = 554;
            return callback(err);
        }
        log('rcpt', { id: session.id, to: rcpt });
        callback();
    },
    onData(stream, session, callback) {
        const chunks = [];
        stream.on('data', chunk => chunks.push(chunk));
        stream.on('end', () => {
            if (stream.sizeExceeded) {
                const err = new Error('5.3.4 Message exceeds fixed maximum message size');
                err.responseCode = 552;
                return callback(err);
            }
            const raw = Buffer.concat(chunks);
            const envelope = {
                from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '',
                to: session.envelope.rcptTo.map(r => r.address),
                eightBit: session.envelope.bodyType === '8bitmime'
            };
            relay(envelope, raw, (err, info) => {
                if (err) {
                    log('relay_failed', { id: session.id, error: String(err && err.message) });
                    const fail = new Error('4.4.2 relay to sink failed: ' + String(err && err.message));
                    fail.responseCode = 451;
                    return callback(fail);
                }
                log('relayed', { id: session.id, from: envelope.from, to: envelope.to, bytes: raw.length });
                callback(null, 'Queued and relayed: ' + String((info && info.response) || ''));
            });
        });
    }
});

server.on('error', err => log('server_error', { error: String(err && err.message) }));

server.listen(config.port, LOOPBACK, () => {
    log('listening', { port: config.port, version: config.version });
});

function shutdown() {
    server.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 3000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
