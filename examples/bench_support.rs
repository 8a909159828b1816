//! Servers that `scripts/bench` measures the broker against, started as separate processes:
//!
//! - `bare ADDR BODY_FILE`: an actix-web handler answering every GET with a constant JSON body
//!   (the body `/session` returned, so both answers have the same size): the baseline.
//! - `redis-get ADDR BODY_FILE REDIS_URL`: the same, after one Redis `GET` per request.
//! - `idp ADDR REDIRECT_URI CLIENT_SECRET`: the development IdP, for the broker's logins.

use std::net::TcpListener;

use actix_web::{web, App, HttpResponse, HttpServer};
use redis::AsyncCommands;
use token_broker::dev_idp::{DevIdp, DevIdpOptions};

fn usage() -> ! {
    eprintln!("usage: bench_support bare ADDR BODY_FILE | redis-get ADDR BODY_FILE REDIS_URL | idp ADDR REDIRECT_URI CLIENT_SECRET");
    std::process::exit(2)
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_else(|| usage());
    match arg(0).as_str() {
        "bare" => {
            let body = web::Data::new(std::fs::read_to_string(arg(2))?);
            HttpServer::new(move || {
                App::new().app_data(body.clone()).default_service(web::to(
                    |body: web::Data<String>| async move {
                        HttpResponse::Ok()
                            .content_type("application/json")
                            .body(body.get_ref().clone())
                    },
                ))
            })
            .bind(arg(1))?
            .run()
            .await
        }
        "redis-get" => {
            let body = web::Data::new(std::fs::read_to_string(arg(2))?);
            let client = redis::Client::open(arg(3)).map_err(std::io::Error::other)?;
            let connection = redis::aio::ConnectionManager::new(client)
                .await
                .map_err(std::io::Error::other)?;
            let connection = web::Data::new(connection);
            HttpServer::new(move || {
                App::new().app_data(body.clone()).app_data(connection.clone()).default_service(web::to(
                    |body: web::Data<String>, connection: web::Data<redis::aio::ConnectionManager>| async move {
                        let mut connection = connection.get_ref().clone();
                        let _: Option<String> = connection.get("bench:baseline").await.ok().flatten();
                        HttpResponse::Ok().content_type("application/json").body(body.get_ref().clone())
                    },
                ))
            })
            .bind(arg(1))?
            .run()
            .await
        }
        "idp" => {
            let listener = TcpListener::bind(arg(1))?;
            let issuer = format!("http://{}", listener.local_addr()?);
            let idp = DevIdp::new(
                url::Url::parse(&issuer).map_err(std::io::Error::other)?,
                DevIdpOptions {
                    client_id: "token-broker-bench".into(),
                    client_secret: Some(arg(3)),
                    token_endpoint_auth_methods: vec!["client_secret_basic".into()],
                    redirect_uris: vec![arg(2)],
                    ..DevIdpOptions::default()
                },
            );
            idp.serve(listener)?.await
        }
        _ => usage(),
    }
}
